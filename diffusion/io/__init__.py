"""What is read from and written to files, as data: the registry that builds a file's config (registry.py),
checkpoints (checkpoints.py), diffusers folders (pretrained.py) and the Analytic-DPM Gamma cache (gamma_cache.py)."""
