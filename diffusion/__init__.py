"""Diffusion models (DDPM, DDIM, PNDM, DeepCache) with Lightning and Hydra."""
