"""Differential privacy: DP-SGD gradients and the privacy accountant."""
