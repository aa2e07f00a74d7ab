"""tumorseg.models."""
