"""tumorseg.registry."""
