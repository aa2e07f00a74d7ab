"""``tumorseg compare``: systems (network, loss, pre-processing) trained and scored side by side."""
