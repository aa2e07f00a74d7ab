"""Hyper-parameter search with Optuna: search space in params.yaml ``tune:``, results in a best-params file."""
