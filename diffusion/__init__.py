"""DDPM-style diffusion models: a Lightning module around Ho et al.'s UNet, samplers written as the papers' algorithms.

Where is X (no imports here: `import diffusion.schedule` stays cheap):

    the noise schedules, q_sample, x0/eps conversions    schedule.py
    timestep spacings (leading, logsnr, ...)              timesteps.py
    the UNet                                              unet.py
    datasets; built-in shapes and mixture                 data.py; synthetic.py
    every sampler (DDPM, DDIM, PNDM, DPM-Solver++, UniPC, Analytic-DPM, consistency)
                                                          sampling/ (its __init__ has the table: paper, file, NFE)
    many images from a sampler (seeds, batches, GPUs)     sampling/generate.py
    DeepCache, Skip-Tuning, x0/v targets, guidance        wrappers/
    the training step, losses, consistency training       training/
    FID, LPIPS, likelihood                                evaluation/
    checkpoints, diffusers folders, the registry          io/
    what train.py and sample.py need (options, resume)    cli/
    the exact Gaussian-mixture oracle                     mixture.py (Frechet distance: frechet.py)
    editing's operators (inpaint, super-res, colorize)    operators.py (DDNM: sampling/ddnm.py)
    errors a user can fix; what a file may hold           errors.py; plain.py, weights.py
    images to uint8, grids, PNG, npz                      images.py

Dependencies point one way: these root modules < sampling, wrappers < io < evaluation < training < cli < the
scripts (tests/test_imports.py walks every import, and refuses cycles and imports of private names).
"""
