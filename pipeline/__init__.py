"""The DVC stages: one module per stage in dvc.yaml (``python -m pipeline.<stage>``)."""
