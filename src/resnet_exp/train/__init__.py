"""Training: the set-up from the config, the step, the optimizer and schedule, the
running metrics, evaluation during training and the loop."""
