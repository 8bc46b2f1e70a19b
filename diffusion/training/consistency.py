"""Consistency training in train.py: the LightningModule (CD, CT, PCM) and the teacher it distils.

The step, clipping, non-finite skip, per-rank RNG, EMA, checkpoints and resume are DiffusionModule's; this module
swaps the loss (diffusion.training.losses), adds the target network (an EMA of rate mu; none for CT, whose target is the
student without gradients) and samples with `consistency_sampling`. The teacher is loaded from the path in the
config (`teacher=`: a train.py checkpoint or a diffusers folder) through diffusion.io.registry, never saved in the
student's checkpoint, and its model and schedule become the run's, so the student starts as the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ..errors import UsageError
from ..io import registry
from ..sampling import consistency as cm
from ..schedule import Schedule
from ..wrappers import prediction
from ..wrappers.guidance import Guided, conditional_net
from . import losses
from .module import DiffusionModule, ema_update

__all__ = ["ConsistencyModule", "adopt_teacher", "METHODS", "check_options"]

METHODS = ("cd", "ct")
OPTIONS = {"method", "N", "k", "solver", "loss", "mu", "phases", "s0", "s1", "grid", "guidance"}


def check_options(options: dict[str, Any], T: int) -> None:
    """Refuse a bad `consistency:` section with the fix (UsageError)."""
    unknown = set(options) - OPTIONS
    if unknown:
        raise UsageError(
            f"consistency.{sorted(unknown)[0]} is not an option: the options are {', '.join(sorted(OPTIONS))}"
        )
    method = options.get("method")
    if method not in METHODS:
        raise UsageError(f"consistency.method={method!r}: use cd (distillation, needs teacher=) or ct (training)")
    if options.get("loss") not in losses.DISTANCES:
        raise UsageError(f"consistency.loss={options.get('loss')!r}: choose one of {', '.join(losses.DISTANCES)}")
    if options.get("grid") not in cm.GRIDS:
        raise UsageError(f"consistency.grid={options.get('grid')!r}: choose karras (Song et al. 2023) or uniform (LCM)")
    if options.get("solver") not in losses.SOLVERS:
        raise UsageError(f"consistency.solver={options.get('solver')!r}: choose one of {', '.join(losses.SOLVERS)}")
    whole = {k: options.get(k) for k in ("N", "k", "phases", "s0", "s1")}
    for key, value in whole.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"consistency.{key}={value!r} must be a whole number >= 1")
    if not whole["N"] <= T or not whole["k"] <= whole["N"]:
        raise UsageError(f"consistency needs 1 <= k={whole['k']} <= N={whole['N']} <= T={T} (k: LCM's skipping step)")
    if not whole["phases"] <= whole["N"]:
        raise UsageError(f"consistency.phases={whole['phases']} exceeds N={whole['N']}: each phase needs grid points")
    if method == "ct" and whole["phases"] != 1:
        raise UsageError("consistency.phases applies to distillation (PCM = method cd with phases > 1), not to ct")
    w = options.get("guidance", 0.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
        raise UsageError(f"consistency.guidance={w!r}: the teacher's guidance scale must be a number >= 0")
    if method == "ct" and w:
        raise UsageError("consistency.guidance guides the teacher of distillation (cd, pcm); ct has no teacher")
    mu = options.get("mu")
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1:
        raise UsageError(f"consistency.mu={mu!r}: the target EMA rate must lie in [0, 1) (CD: 0.95; 0: no EMA)")


def lpips_distance(model: nn.Module) -> nn.Module:
    """LPIPS from the user's weight files (diffusion.evaluation.lpips says where they go), for RGB images only."""
    from ..evaluation.lpips import LPIPS  # torchvision's VGG16: imported only when asked for

    channels = getattr(model, "in_channels", 3)
    if channels != 3:
        raise UsageError(f"consistency.loss=lpips compares RGB images (VGG16), the model has {channels} channels: "
                         "use loss=pseudo_huber or l2")  # fmt: skip
    return LPIPS.from_files()


# ---------------------------------------------------------------- the teacher
def adopt_teacher(cfg: DictConfig, explicit: Iterable[str] = ()) -> nn.Module | None:
    """Load cfg.teacher (a .ckpt of train.py, or a diffusers folder) for CD; make its model and schedule the run's
    (cfg.model, cfg.schedule), so the student is built as the teacher and the checkpoint loads like any other, and
    bind the run to it: cfg.teacher_digest is its weights' digest, recorded in every checkpoint; a run that has one
    (resumed, or asked for) refuses a teacher with other weights, wherever it now lies.

    Refused in one line: `explicit` keys (those the command line sets) that set the model or schedule to something
    else than the teacher's, and data of another size or channel count than the teacher's. Returns the teacher
    (eval, frozen), or None for CT."""
    method = cfg.consistency.get("method")
    if method != "cd":
        if cfg.get("teacher"):
            raise UsageError("teacher= is for distillation (experiment=cd or pcm); consistency training has no teacher")
        return None
    if not cfg.get("teacher"):
        raise UsageError(
            "consistency distillation needs a teacher: teacher=outputs/.../checkpoints/last.ckpt (a train.py "
            "checkpoint) or teacher=DIR (a diffusers folder such as google/ddpm-cifar10-32)"
        )
    path = Path(str(cfg.teacher))
    if path.is_dir():
        from ..io import pretrained

        net, schedule = pretrained.load(path)
        model_cfg, schedule_cfg = _unet_config(prediction.inner(net)), _schedule_config(schedule, path)
    else:
        from ..io import checkpoints

        checkpoint = checkpoints.load(path, option="teacher")
        saved = checkpoint["config"]
        if isinstance(saved, dict) and saved.get("consistency"):
            raise UsageError(f"teacher={path} is a consistency model: distil from a diffusion model's checkpoint")
        net, schedule = checkpoints.load_model(checkpoint, use_ema=True)
        model_cfg, schedule_cfg = saved["model"], saved["schedule"]
    registry.check("model", model_cfg, where=f"teacher {path} model")
    registry.check("schedule", schedule_cfg, where=f"teacher {path} schedule")
    digest = _bind(cfg, prediction.inner(net), path)
    predicts = net.prediction if isinstance(net, prediction.Prediction) else "eps"
    _check_against_teacher(cfg, model_cfg, schedule_cfg, prediction.inner(net), path, explicit, predicts)
    with open_dict(cfg):
        cfg.model, cfg.schedule, cfg.teacher_digest = model_cfg, schedule_cfg, digest
        cfg.module.prediction = predicts  # the student predicts what the teacher does: it starts as the teacher
        if model_cfg.get("num_classes"):  # a class-conditional teacher: so is the student, on the data's labels
            cfg.conditional = True
    return net.eval().requires_grad_(False)


def _bind(cfg: DictConfig, net: nn.Module, path: Path) -> str:
    """The digest of the teacher's weights, checked against the run's own (cfg.teacher_digest) when it has one."""
    from ..weights import weights_digest

    digest, recorded = weights_digest(net), cfg.get("teacher_digest")
    if recorded is not None and digest != recorded:
        raise UsageError(
            f"teacher={path} is not this run's teacher: its weights' digest is {digest[:12]}..., the run was "
            f"distilled from {recorded[:12]}... (the file at that path has changed, e.g. a teacher run that kept "
            "training); pass teacher=PATH to the original weights, or start a new run without resume="
        )
    if recorded is None and cfg.get("resume"):
        rank_zero_warn(
            f"the checkpoint does not record its teacher's digest (written before teachers were bound): taking "
            f"{path} as the teacher, digest {digest[:12]}..., recorded from now on"
        )
    return digest


def _check_against_teacher(cfg: DictConfig, model_cfg: dict, schedule_cfg: dict, net: nn.Module, path: Path,
                           explicit: Iterable[str], predicts: str = "eps") -> None:  # fmt: skip
    """UsageError naming what the command line or the data would change of the student, which is the teacher."""
    keys = [k for k in explicit if k.split(".")[0] in ("model", "schedule")]
    today = {"model": OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else {},
             "schedule": OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else {}}  # fmt: skip
    teacher = {"model": model_cfg, "schedule": schedule_cfg}
    conflicts = []
    for key in sorted(set(keys)):
        section, _, name = key.partition(".")
        ours = OmegaConf.select(OmegaConf.create(today), key) if name else today[section]
        theirs = OmegaConf.select(OmegaConf.create(teacher), key) if name else teacher[section]
        if ours != theirs:
            conflicts.append(f"{key}={_short(ours)} (the teacher's: {_short(theirs)})")
    ours = cfg.module.get("prediction", "eps")
    if any(k in ("module", "module.prediction") for k in explicit) and ours != predicts:
        conflicts.append(f"module.prediction={ours} (the teacher predicts {predicts})")
    size, channels = cfg.data.get("image_size"), cfg.data.get("channels", 3)
    if size != net.resolution:
        conflicts.append(f"data.image_size={size} (the teacher takes {net.resolution}x{net.resolution} images)")
    if channels != net.in_channels:
        conflicts.append(f"data.channels={channels} (the teacher takes {net.in_channels})")
    if conflicts:
        raise UsageError(
            f"the student of teacher={path} is the teacher's network on the teacher's data, but this run asks for "
            + "; ".join(conflicts)
            + ": drop those overrides, or distil another teacher"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unet_config(net: nn.Module) -> dict[str, Any]:
    """The conf/model entry that rebuilds our UNet `net` (read back from its layers, as diffusers_config does in
    diffusion.io.export)."""
    from ..unet import Attention

    ch = net.ch
    return {
        "_target_": "diffusion.unet.UNet", "in_channels": net.in_channels, "out_channels": net.conv_out.out_channels,
        "ch": ch, "ch_mult": [level.res[0].conv2.out_channels // ch for level in net.down],
        "num_res_blocks": net.num_res_blocks,
        "attn_resolutions": [net.resolution >> i for i, lv in enumerate(net.down) if isinstance(lv.attn[0], Attention)],
        "dropout": net.down[0].res[0].dropout.p, "resolution": net.resolution, "norm_groups": net.norm_out.num_groups,
    }  # fmt: skip


def _schedule_config(schedule: Schedule, where: Path) -> dict[str, Any]:
    """The conf/schedule entry of a diffusers folder's schedule: one of ours by name, with its T and beta range."""
    from ..schedule import SCHEDULES

    T, betas = schedule.T, schedule.betas
    first, last = betas[0].item(), betas[-1].item()
    for name, build in SCHEDULES.items():
        kwargs = {"T": T} if name == "cosine" else {"T": T, "beta_start": first, "beta_end": last}
        if torch.allclose(build(**kwargs).betas, betas, rtol=1e-9, atol=0):
            return {"_target_": f"diffusion.schedule.{name}", **kwargs}
    raise UsageError(f"{where}: its betas are none of linear, cosine, quadratic, sigmoid, which a run's config names")


# ---------------------------------------------------------------- the module
class ConsistencyModule(DiffusionModule):
    """CD (Song et al. 2023, Alg. 2), PCM (Wang et al. 2024: CD with phases > 1) or CT (Alg. 3 with Song & Dhariwal
    2023's pseudo-Huber loss, N curriculum, lognormal n and no target EMA) of `model` under DiffusionModule's step.

    Args:
        teacher: the frozen eps-model CD distils (the student starts from its weights); None for CT.
        method, N, k, solver, loss, mu, phases, grid: conf/experiment/cd.yaml documents them.
        s0, s1: CT's curriculum N from s0 to min(s1, T) intervals over the run's max_steps.
        guidance: a class-conditional teacher's classifier-free guidance scale w, fixed (LCM's recipe, Luo et al.
            2023: the student learns the guided ODE, so its few-step samples are guided; 0: the conditional ODE).
        grid: the configs say karras; absent (a checkpoint written before the option) it is the uniform grid that
            run was trained on, so it resumes unchanged.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, optimizer, *, teacher: nn.Module | None = None,
                 method: str = "cd", N: int = 50, k: int = 1, solver: str = "ddim", loss: str = "l2",
                 mu: float = 0.95, phases: int = 1, s0: int = 10, s1: int = 1280, grid: str = "uniform",
                 guidance: float = 0.0, **kwargs) -> None:  # fmt: skip
        options = dict(method=method, N=N, k=k, solver=solver, loss=loss, mu=mu, phases=phases, s0=s0, s1=s1, grid=grid,
                       guidance=guidance)  # fmt: skip
        check_options(options, schedule.T)
        if schedule.zero_terminal:
            raise UsageError(
                "consistency models under zero terminal SNR are not supported: their eps form divides by "
                "sqrt(alpha_bar), which is 0 at T-1; distil or train on the schedule without it"
            )
        if (teacher is None) != (method == "ct"):
            raise UsageError("consistency distillation needs a teacher and training takes none (see adopt_teacher)")
        if teacher is not None:
            model.load_state_dict(prediction.inner(teacher).state_dict())  # the student starts as the teacher
        super().__init__(model, schedule, optimizer, **kwargs)
        self.method, self.N, self.k, self.solver = method, N, k, solver
        self.mu, self.phases, self.s0, self.s1, self.grid = mu, phases, s0, s1, grid
        self.guidance = float(guidance)
        # The target network theta^-: an EMA of rate mu for CD, saved with the run; CT's is the student itself.
        self.target = copy.deepcopy(model).eval().requires_grad_(False) if method == "cd" else None
        self._teacher = [teacher]  # in a list: not a submodule, so never in the checkpoint; moved in setup()
        # LPIPS (Song et al.'s CD on images): frozen VGG16 weights the user supplies, loaded now so that a missing file
        # stops the run before it trains; like the teacher, never in the checkpoint, never sharded, never averaged.
        self._distance = [lpips_distance(model) if loss == "lpips" else loss]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._teacher[0] is not None:
            self._teacher[0] = self._teacher[0].to(self.device)
        if isinstance(self._distance[0], nn.Module):
            self._distance[0] = self._distance[0].to(self.device)

    def curriculum(self) -> int:
        """N for this step: fixed for CD; the improved CT curriculum over max_steps, capped at T (losses.ct_steps)."""
        if self.method == "cd":
            return self.N
        total = max(1, int(self.trainer.max_steps)) if self._trainer is not None else 1
        return min(losses.ct_steps(self.global_step, total, self.s0, self.s1), self.schedule.T)

    def training_loss(self, batch: Tensor | tuple[Tensor, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The CT or CD loss of a batch; a labelled batch (a class-conditional student) binds its labels, a `cond_drop`
        share of them dropped, to the student, its target and the teacher (guided at `guidance`)."""
        x0, y = self.split(batch)
        if y is not None:
            y = losses.drop_labels(y, self.cond_drop, self.num_classes, generator)
        f = partial(cm.consistency, self.eps_model(self.labelled(self.model, y)), self.schedule)
        if self.method == "ct":
            return losses.ct_loss(f, f, self.schedule, x0, N=self.curriculum(), loss=self._distance[0],
                                  grid=self.grid, generator=generator)  # fmt: skip
        f_target = partial(cm.consistency, self.eps_model(self.labelled(self.target, y)), self.schedule)
        return losses.cd_loss(f, f_target, self.teacher_model(y), self.schedule, x0, N=self.N, k=self.k,
                              phases=self.phases, solver=self.solver, loss=self._distance[0], grid=self.grid,
                              generator=generator)  # fmt: skip

    def labelled(self, net: nn.Module, y: Tensor | None) -> nn.Module:
        """`net` with the batch's labels bound (itself for an unconditional network)."""
        return net if y is None else conditional_net(net, y)

    def teacher_model(self, y: Tensor | None) -> nn.Module:
        """The teacher as CD's eps-model: with labels, guided at the fixed scale `guidance` (x0/v: inside its
        conversion, as sample.py guides)."""
        teacher = self._teacher[0]
        if y is None:
            return teacher
        guided = Guided(prediction.inner(teacher), self.num_classes, scale=self.guidance, labels=y)
        return prediction.around(teacher, guided)

    def on_finite_step(self) -> None:
        super().on_finite_step()
        if self.target is not None:
            ema_update(self.target, self.model, self.mu)

    def log_step(self, loss: Tensor) -> None:
        self.log("train/consistency_loss", loss)
        if self.method == "ct":
            self.log("train/ct_N", float(self.curriculum()))

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        g = torch.Generator(self.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        with torch.no_grad():
            loss = self.training_loss(batch, generator=g)
        self.log("val/consistency_loss", loss, sync_dist=True, batch_size=len(self.split(batch)[0]))

    @torch.no_grad()
    def sample(self, n: int, steps: int = 1, *, use_ema: bool = True, seed: int = 0) -> Tensor:
        """n images [n, C, H, W] in [-1, 1] from `steps`-step consistency sampling (PCM: deterministic, as sample.py
        would draw them from the checkpoint)."""
        net = self.ema if use_ema else self.model
        if self.num_classes is not None:  # image i of class i % num_classes, as sample.py draws them
            net = conditional_net(net, torch.arange(n, device=self.device) % self.num_classes)
        net = cm.ConsistencyModel(self.eps_model(net), self.schedule, self.phases)
        shape = self.config.get("image_shape") or (net.in_channels, net.resolution, net.resolution)
        g = torch.Generator(self.device).manual_seed(seed)
        x = torch.randn((n, *shape), generator=g, device=self.device)
        steps = min(steps, self.schedule.T)
        with torch.autocast(self.device.type, enabled=False):
            out = cm.consistency_sampling(
                net, x, self.schedule, torch.zeros(steps), generator=g, noise=self.phases == 1
            )
        return out.clamp(-1, 1)
