"""Formats, layouts, manifest, synthetic data, preprocessing and the datamodule."""
