"""dtg: semi-supervised object detection with Dense Teacher Guidance (DTG-SSOD)."""

__version__ = "0.1.0"
