"""Prefect flows: `train` (the warm training loop), `pipeline` (the dvc repro chain) and `serve`."""
