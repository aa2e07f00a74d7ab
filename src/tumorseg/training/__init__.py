"""tumorseg.training."""
