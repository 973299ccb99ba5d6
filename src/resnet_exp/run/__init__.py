"""A run and its folder: the command's context (devices, processes, stop and time limit)
and what a run leaves on disk (checkpoint, records, result)."""
