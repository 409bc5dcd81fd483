"""Pipeline stages: one module per stage of dvc.yaml, each runnable as ``python -m stages.X``."""
