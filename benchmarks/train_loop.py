"""train.py's whole loop against the bare training step it runs: what Lightning, the data stream and logging cost.

The loop is `train(cfg)` itself on an in-memory copy of the built-in shapes, with everything a real run does
per step (the resumable data stream, logging every `trainer.log_every_n_steps`, clipping, the optimizer, EMA,
the checkpoint callback's checks); validation, sample grids and checkpoint saves are pushed past the timed steps.
A callback times steps `--warmup` + 1 .. `--warmup` + `--steps`, draining the GPU at both ends. The bare step is
`benchmarks.train_speed.make_step` with the precision, clipping, fused Adam, EMA and compile setting the loop
actually used (read back from the trained module), on one batch already on the device. On a GPU (`--pairing
block`) the loop's steps are timed together, then as many bare steps; on a CPU (`--pairing step`) every loop step
is paired with one bare step of a twin network right after it, as sample_speed.py pairs calls, since other work
on a shared CPU would otherwise land on one side only.

    python benchmarks/train_loop.py                                  # unet_tiny, batch 16, fp32 and bf16, CPU
    python benchmarks/train_loop.py --steps 100 --threads 1 --workers 0 --out benchmarks/results  # the CPU table
    python benchmarks/train_loop.py --device cuda --model unet_cifar10 --batch 128 --compile
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: train.py, benchmarks.* from the root
from benchmarks.testbed import machine, seconds
from benchmarks.train_speed import make_step
from diffusion.schedule import linear
from diffusion.synthetic import Synthetic
from diffusion.training.losses import eps_loss
from tests.conftest import compose_config  # the real configs, composed as @hydra.main composes them

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # make_step's names -> Lightning's

# ---------------------------------------------------------------- the loop's pieces: data and a clock


class InMemory(Synthetic):
    """data=synthetic drawn once into memory: loading a batch costs indexing, not drawing shapes."""

    def build(self) -> tuple[Dataset, Dataset]:
        return tuple(_Stacked(part) for part in super().build())


class _Stacked(Dataset):
    def __init__(self, images: Dataset) -> None:
        self.images = torch.stack([images[i] for i in range(len(images))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class StepClock(L.Callback):
    """Wall time of the batches after the first `skip` training steps, up to the end (trainer.max_steps), with the
    GPU drained at both ends so the time covers all the work queued."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.seconds, self.batches = skip, None, None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.start is not None:
            self.batches += 1
        if trainer.global_step < self.skip or (self.start is not None and trainer.global_step < trainer.max_steps):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.seconds = time.perf_counter() - self.start


class PairedClock(L.Callback):
    """On a CPU: each of the loop's steps after the first `skip`, and right after it one bare step (make_step with
    the loop's own settings, on a fresh copy of the run's network), each timed apart, so that a load change on a
    shared machine hits a step and its twin alike. A loop step's time runs from the end of the previous bare step
    to the end of this step's batch: the data, the step, the logging and every callback."""

    def __init__(self, skip: int) -> None:
        self.skip, self.loop_times, self.bare_times = skip, [], []
        self._bare, self._mark = None, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        now = time.perf_counter()
        if pl_module.device.type != "cpu":
            raise ValueError("PairedClock times steps on the host, which needs a CPU run: use StepClock on a GPU")
        if trainer.global_step > self.skip:
            self.loop_times.append(now - self._mark)
            self.bare_times.append(seconds(self._bare, pl_module.device))
        elif trainer.global_step == self.skip:  # the twin: the run's network, fresh, with the loop's settings
            shape = tuple(batch.shape[1:])
            model = instantiate(pl_module.config["model"])
            self._bare = make_step(model, batch=len(batch), shape=shape, device=pl_module.device,
                                   **step_settings(pl_module))  # fmt: skip
            seconds(self._bare, pl_module.device, 2)  # its warm-up
        self._mark = time.perf_counter()


# ---------------------------------------------------------------- one round: the loop, then the bare step


def loop_config(overrides: list[str], run_dir: Path, *, warmup: int, steps: int, pairing: str = "block") -> DictConfig:
    """conf/train.yaml with `overrides`, on in-memory data, timed by a StepClock (pairing "block") or a PairedClock
    ("step"), with no validation, sample grid, checkpoint save or progress bar inside the timed steps."""
    cfg = compose_config(
        "train",
        ["logger=csv", "data=synthetic", *overrides, f"trainer.max_steps={warmup + steps}",
         "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
         "~callbacks.progress", "callbacks.samples.every_n_steps=1000000000", "callbacks.fid.every_n_steps=0",
         "callbacks.checkpoints.last_every_n_steps=1000000000", "callbacks.checkpoints.keep_every_n_steps=0"],
        run_dir,
    )  # fmt: skip
    clock = {"block": "StepClock", "step": "PairedClock"}[pairing]
    with open_dict(cfg):  # this module's classes by their importable name, also when it runs as __main__
        cfg.data._target_ = "benchmarks.train_loop.InMemory"
        cfg.callbacks.clock = {"_target_": f"benchmarks.train_loop.{clock}", "skip": warmup}
    return cfg


def step_settings(module: L.LightningModule) -> dict[str, Any]:
    """What the loop's step ran with, for make_step: precision and fused Adam as resolved at run time, clipping, EMA
    and compile as the module holds them."""
    precision = {v: k for k, v in PRECISIONS.items()}.get(str(module.trainer.precision))
    if precision is None:
        raise ValueError(f"precision {module.trainer.precision} has no bare twin here: use 32-true or bf16-mixed")
    fused = bool(module.trainer.optimizers[0].defaults.get("fused"))
    return dict(precision=precision, compile=module.compile, clip=module.grad_clip, fused=fused,
                ema_decay=module.ema_decay)  # fmt: skip


def bare_rate(model: torch.nn.Module, settings: dict[str, Any], *, batch: int, shape: tuple[int, int, int],
              device: torch.device, warmup: int, steps: int, channels_last: bool = False) -> float:  # fmt: skip
    """Images/s of `steps` bare training steps (make_step with `settings`) after `warmup` untimed ones."""
    step = make_step(model, batch=batch, shape=shape, device=device, channels_last=channels_last, **settings)
    seconds(step, device, warmup)
    return steps * batch / seconds(step, device, steps)


def step_flops(model: torch.nn.Module, *, batch: int, shape: tuple[int, int, int], device: torch.device,
               precision: str) -> int:  # fmt: skip
    """FLOPs of one forward and backward of the DDPM loss at `batch` (FlopCounterMode: matmuls, convolutions,
    attention; the elementwise work is not counted, as MFU counts it)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).train()
    x0 = torch.randn(batch, *shape, device=device)
    schedule = linear(T=1000).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = eps_loss(model, schedule, x0)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def loop_and_bare(overrides: list[str], *, warmup: int, steps: int, bare_models: dict | None = None,
                  pairing: str = "block") -> dict:  # fmt: skip
    """One round of train(cfg) and the bare step of its network ("ours") with the loop's settings.

    pairing "block" (GPUs): the loop timed by StepClock, then as many bare steps of ours and of `bare_models`
    (name -> builder(our network) -> model, e.g. diffusers' twin). "step" (CPUs): PairedClock's step-by-step pairs;
    rates from the median step times, and `ratios`, loop over bare images/s for each pair.
    Returns rates (images/s by "loop", "ours" and the names in bare_models), ratios, settings, models, params,
    device, batch, shape and the number of timed steps."""
    from train import train  # the entry point itself

    with tempfile.TemporaryDirectory(prefix="train_loop-") as tmp:
        cfg = loop_config(overrides, Path(tmp), warmup=warmup, steps=steps, pairing=pairing)
        module = train(cfg)
        clock = next(c for c in module.trainer.callbacks if type(c).__name__.endswith("Clock"))
        batch = cfg.data.batch_size * module.trainer.world_size
        settings, device = step_settings(module), module.device
    torch.manual_seed(cfg.seed)  # train() builds the network right after seeding: the same starting weights
    ours = instantiate(cfg.model)
    shape, models = (ours.in_channels, ours.resolution, ours.resolution), {"ours": ours}
    if pairing == "step":
        loop, bare, timed = clock.loop_times, clock.bare_times, len(clock.loop_times)
        rates = {"loop": batch / statistics.median(loop), "ours": batch / statistics.median(bare)}
        ratios = [b / a for a, b in zip(loop, bare, strict=True)]
    else:
        rates, ratios, timed = {"loop": clock.batches * batch / clock.seconds}, [], clock.batches
        models.update({name: build(ours) for name, build in (bare_models or {}).items()})
        for name, model in models.items():  # the same number of steps as the loop timed
            try:
                rates[name] = bare_rate(model, settings, batch=batch, shape=shape, device=device, warmup=warmup,
                                        steps=timed)  # fmt: skip
            except Exception:  # another library's model (torch.compile of diffusers' UNet): a row, not the table
                if name == "ours":
                    raise
                traceback.print_exc()
                rates[name] = math.nan
    params = sum(p.numel() for p in ours.parameters())
    return dict(rates=rates, ratios=ratios, settings=settings, models=models, params=params, device=device,
                batch=batch, shape=shape, steps=timed)  # fmt: skip


# ---------------------------------------------------------------- the CPU table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_tiny", help="a conf/model/ option")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pairing", choices=["step", "block"], default=None,
                        help="step: each loop step paired with a bare one (CPU default); block: the loop's steps, "
                        "then as many bare ones (GPU default)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="module.compile=true (and the bare step compiled)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="runs of train.py per precision")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write train_loop_<device>.md into this folder")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.rounds, args.image_size) < 1 or args.warmup < 1:
        parser.error("--batch, --steps, --rounds, --image-size and --warmup must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    args.pairing = args.pairing or ("step" if args.device == "cpu" else "block")
    if args.pairing == "step" and args.device != "cpu":
        parser.error("--pairing step times each step on the host, which needs a CPU: use --pairing block on a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, started, trainer = [], time.perf_counter(), "cpu" if args.device == "cpu" else "gpu"
    for precision in args.precisions:
        overrides = [f"model={args.model}", f"data.image_size={args.image_size}", f"data.batch_size={args.batch}",
                     f"data.num_workers={args.workers}", "data.num_images=1024", "data.num_val=8",
                     f"trainer={trainer}", f"trainer.precision={PRECISIONS[precision]}",
                     f"module.compile={str(args.compile).lower()}"]  # fmt: skip
        runs = [loop_and_bare(overrides, warmup=args.warmup, steps=args.steps, pairing=args.pairing)
                for _ in range(args.rounds)]  # fmt: skip
        if args.pairing == "step":  # medians over all pairs of all rounds
            ratios = sorted(r for run in runs for r in run["ratios"])
            loop, bare = (statistics.median(run["rates"][k] for run in runs) for k in ("loop", "ours"))
        else:  # the least disturbed round of each: load only slows a run down
            ratios = sorted(run["rates"]["loop"] / run["rates"]["ours"] for run in runs)
            loop, bare = (max(run["rates"][k] for run in runs) for k in ("loop", "ours"))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append((precision, runs[0], bare, loop, quartiles))

    first = rows[0][1]
    settings = ", ".join(f"{k}={v}" for k, v in first["settings"].items() if k != "precision")
    how = {
        "step": "each loop step paired with one bare step right after it; images/s from the median step times, "
        "the ratio as the median of the pairs' ratios",
        "block": "the loop's steps, then as many bare steps; images/s of the fastest round of each",
    }[args.pairing]
    lines = [
        f"# train.py's loop vs the bare step: {args.model} ({first['params']:,} params), "
        f"{args.image_size}x{args.image_size}, batch {first['batch']}, {args.device}",
        "",
        f"Machine: {machine(first['device'])}. The step, read back from the loop: {settings}. "
        f"{first['steps']} timed steps after {args.warmup} warm-up, {args.rounds} run(s) of train.py per precision; "
        f"{how}. {time.perf_counter() - started:.0f} s.",
        "",
        "    python benchmarks/train_loop.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "",
        "| precision | bare step, images/s | train.py loop, images/s | loop / bare | quartiles of loop / bare |",
        "|---|---:|---:|---:|---:|",
        *(f"| {p} | {b:.1f} | {lp:.1f} | {q[1]:.3f} | {q[0]:.3f} .. {q[2]:.3f} |" for p, _, b, lp, q in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"train_loop_{args.device}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
