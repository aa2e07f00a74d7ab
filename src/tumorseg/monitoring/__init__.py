"""Drift monitoring: reference profiles stored with registered models, per-case checks, ``tumorseg monitor``."""
