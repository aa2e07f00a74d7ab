"""tumorseg.evaluation."""
