"""Sample from a trained model: `python sample.py sampler=pndm steps=50` (newest checkpoint), `ckpt=PATH` or
`pretrained=DIR` (a diffusers folder). Several GPUs: `torchrun --nproc_per_node=N sample.py ...`."""

from __future__ import annotations

import warnings

import hydra
import numpy as np
from omegaconf import DictConfig

from diffusion.cli import conditioning, runs
from diffusion.cli import sample_run as run
from diffusion.cli.options import check_options
from diffusion.errors import reported
from diffusion.sampling.analytic import timesteps_for
from diffusion.sampling.generate import check_room, distributed
from diffusion.timesteps import StartWarning


def sample(cfg: DictConfig) -> np.ndarray | None:
    """Draw cfg.n_samples images; write samples.npz (uint8 NHWC), grid.png, optionally PNGs, FID and a W&B run.
    Returns the images on the main process (None on the others). Everything that can be checked is checked before
    the first image is drawn; once samples.npz is written, a later error says where it is."""
    with distributed() as dist, warnings.catch_warnings():
        check_options(cfg, dist.world)  # before anything is loaded
        device = dist.device(cfg.device)
        source, model, schedule, trained, weights = run.load(cfg, device)
        num_classes = conditioning.check_sampling(cfg, model, source)  # labels and guidance the model can take
        guide = conditioning.load_guide(cfg, model, schedule, device)  # autoguidance's weaker model, if any
        sampler, spacing, shape = run.plan(cfg, model, schedule, source, device, guide)
        warnings.simplefilter("ignore", StartWarning)  # plan said it once; the sampler would say it again
        out = dist.on_main(runs.claim_out_dir, cfg.out_dir, cfg.overwrite)  # rank 0's folder, free of old samples
        dist.on_main(check_room, cfg.n_samples, shape, out)
        after = run.prepare(dist, cfg, trained, shape)  # FID's reference, the logger: checked now
        sampler, gamma = run.with_gamma(dist, cfg, sampler, model, schedule, trained, weights, source, device)
        ts = timesteps_for(spacing, cfg.steps, schedule, gamma)
        # DeepCache, Skip-Tuning, autocast, labels and guidance: no sampler knows about them
        net = run.wrap(cfg, model, ts, guide, schedule)
        labels = None if num_classes is None else conditioning.image_labels(cfg.labels, num_classes, cfg.n_samples)
        if dist.is_main:
            print(f"sampling {cfg.n_samples} images from {source} with {run.describe(cfg, spacing)} on {device} "
                  f"-> {out}")  # fmt: skip
        images, stats = run.draw(dist, net, sampler, schedule, ts, shape, cfg, device, labels)
        if not dist.is_main:
            return None
    run.write(images, out, cfg, stats, after, source, trained, spacing, conditioning.as_array(labels))
    return images


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported():
        sample(cfg)


if __name__ == "__main__":
    main()
