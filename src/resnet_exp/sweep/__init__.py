"""Sweeps: packing several runs onto one device, the paper campaign that
banks finished runs window after window, and the hyper-parameter search."""
