"""Training: the LightningModule (module.py), the objectives (losses.py), consistency models (consistency.py), the
callbacks that show a run (callbacks.py), the numeric plan of a step (precision.py) and FSDP (strategies.py)."""
