"""Model wrappers, `model(x, t) -> eps` around a network, which no sampler knows about: DeepCache (deepcache.py),
Skip-Tuning (skiptuning.py), and the MAC counts their cost ratios are built on (macs.py)."""
