"""tumorseg.compression."""
