"""tumorseg.validation."""
