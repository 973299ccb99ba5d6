"""The modes besides training: mode=eval (a trained run evaluated again) and
mode=diagnose (gradient flow at initialisation)."""
