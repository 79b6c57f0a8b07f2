"""Data layer: discovery, validation, folds, synthetic data and NIfTI I/O."""
