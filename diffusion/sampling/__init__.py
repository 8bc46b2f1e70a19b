"""Every sampler: one file per paper, one contract, `sampler(model, x, schedule, timesteps, *, generator, **options)`.

    sampler                    algorithm (paper)                                        file            NFE, S steps
    ddpm                       ancestral sampling (Ho et al. 2020), respaced            ddpm.py         S
                               (Nichol & Dhariwal 2021)
    ddim                       DDIM (Song et al. 2021)                                  ddim.py         S
    pndm, s_pndm, plms         F-PNDM, S-PNDM, PLMS (Liu et al. 2022)                   pndm.py         S + 9, S + 1
    dpm_solver, dpm_solver_3m  DPM-Solver++(2M), (3M) (Lu et al. 2022)                  dpm_solver.py   S
    unipc                      UniPC (Zhao et al. 2023)                                 unipc.py        S
    analytic_ddpm, _ddim       Analytic-DPM (Bao et al. 2022)                           analytic.py     S
    fon                        classical RK4 on the ODE (the PNDM paper's FON)          fon.py          4 (S - 1) + 1
    pf                         probability-flow ODE, adaptive RK45 (Song et al. 2021)   pf.py           the solver's
    consistency_sampling       multistep consistency sampling (Song et al. 2023)        consistency.py  S

core.py holds what they share (the step list, x0 from eps, DDIM's update, the noise source); generate.py draws many
images with any of them (per-image seeds, batches, several processes). What wraps the model instead (DeepCache,
Skip-Tuning) is in diffusion.wrappers: no sampler knows about it. Each sampler is re-exported here under its own
name (`from diffusion.sampling import ddim`; the configs' `_target_: diffusion.sampling.ddim`), which shadows the
module of the same name: import a module itself with importlib or `from diffusion.sampling.ddim import ddim`.
"""

from .analytic import analytic_ddim, analytic_ddpm
from .consistency import consistency_sampling
from .core import Model, NoiseSource, randn_like
from .ddim import ddim
from .ddpm import ddpm
from .dpm_solver import dpm_solver, dpm_solver_3m
from .fon import fon
from .pf import pf
from .pndm import plms, pndm, s_pndm
from .unipc import unipc

__all__ = ["ddpm", "ddim", "pndm", "s_pndm", "plms", "dpm_solver", "dpm_solver_3m", "unipc", "analytic_ddpm",
           "analytic_ddim", "fon", "pf", "consistency_sampling", "Model", "NoiseSource", "randn_like"]  # fmt: skip
