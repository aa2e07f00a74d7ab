"""tumorseg.serving."""
