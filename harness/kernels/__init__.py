"""Numpy reference kernels of the non-NMS ops two-stage detectors deploy."""
