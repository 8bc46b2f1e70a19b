"""Measuring models and samples: FID (fid.py) with the FID Inception (inception.py), LPIPS (lpips.py), the
negative log-likelihood bound (likelihood.py), the quickstart's shape score (shapes.py)."""
