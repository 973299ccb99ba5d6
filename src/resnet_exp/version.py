"""The version of resnet-exp (the wheel's, read by hatch from here)."""

__version__ = "0.1.0"
