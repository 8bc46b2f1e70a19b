"""The LightningModule that trains a noise-prediction network: its step (clip, check, skip), the EMA of its weights,
its preview samples and its checkpoint state (the loss: diffusion.training.losses)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .. import timesteps
from ..errors import UsageError
from ..sampling.ddim import ddim
from ..schedule import PREDICTIONS, Schedule
from ..wrappers.guidance import conditional_net, num_classes_of
from ..wrappers.prediction import Prediction
from .losses import WEIGHTINGS, diffusion_loss, drop_labels

__all__ = ["ema_update", "DiffusionModule", "DivergenceError", "check_objective"]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def check_objective(prediction: str, weighting: str, gamma: float, schedule: Schedule) -> None:
    """UsageError, in one line, for an objective that cannot be trained: an unknown target or weighting, a gamma that
    is not a positive number, or eps-prediction under zero terminal SNR (there x_{T-1} = eps, so eps says nothing
    about x0: Lin et al. 2024 train v)."""
    if prediction not in PREDICTIONS:
        raise UsageError(f"module.prediction={prediction!r}: choose one of {', '.join(PREDICTIONS)}")
    if weighting not in WEIGHTINGS:
        raise UsageError(f"module.loss_weight={weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma < float("inf"):
        raise UsageError(f"module.snr_gamma={gamma!r}: use a number > 0 (Min-SNR's gamma; the paper's: 5)")
    if schedule.zero_terminal and prediction == "eps":
        raise UsageError(
            "schedule.zero_terminal_snr=true with module.prediction=eps: at T-1 the noisy image is the noise itself, "
            "so eps-prediction says nothing about x0 there; use module.prediction=v"
        )


LR_DECAYS = ("none", "cosine")


def lr_factor(step: int, *, warmup: int, total: int | None) -> float:
    """The learning rate's multiplier at `step`: linear warm-up to 1 over `warmup` steps, then constant (total
    None) or a half cosine down to 0 at `total`."""
    if step + 1 < warmup or total is None:
        return min(1.0, (step + 1) / warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step + 1 - warmup) / max(1, total - warmup))))


class DivergenceError(UsageError):
    """Training stopped because the loss or the gradients stayed non-finite for too many steps in a row."""


class DiffusionModule(L.LightningModule):
    """A noise-prediction network, its EMA copy and the DDPM training loop.

    The step is written out (manual optimization) so that one place clips, checks and skips: a non-finite gradient
    norm leaves the weights, the EMA and the optimizer untouched and is counted (`train/skipped_steps`); after
    `max_bad_steps` such steps in a row the run stops with a `DivergenceError`.

    Args:
        model: the network, `model(x_t, t) -> eps`.
        schedule: the noise schedule the network is trained under.
        optimizer: a partial optimizer, `optimizer(params) -> torch.optim.Optimizer` (Hydra's `_partial_`).
        warmup_steps: linear learning-rate warm-up from 0 (DDPM used 5000).
        lr_decay: "none" (DDPM's constant rate after warm-up) or "cosine": down to 0 at the trainer's max_steps,
            which a short run (the quickstart) needs to settle; the rate follows the step, so resume keeps it.
        ema_decay: decay of the weight average used for sampling (DDPM: 0.9999).
        grad_clip: max global gradient norm (DDPM: 1); None or 0 turns clipping off.
        max_bad_steps: non-finite steps in a row after which the run stops.
        fused: build the optimizer with its fused kernel (decided by diffusion.training.precision.plan_step).
        compile: wrap the network's forward in `torch.compile`.
        config: the run's resolved config, stored in every checkpoint so sampling needs nothing else.
        cond_drop: a class-conditional network's (UNet num_classes) chance of training a batch row without its
            label (Ho & Salimans 2022: 0.1 or 0.2), so that it is also the unconditional model guidance needs.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 5000,
        lr_decay: str = "none",
        ema_decay: float = 0.9999,
        grad_clip: float | None = 1.0,
        max_bad_steps: int = 20,
        fused: bool = False,
        compile: bool = False,
        config: dict[str, Any] | None = None,
        prediction: str = "eps",
        loss_weight: str = "uniform",
        snr_gamma: float = 5.0,
        cond_drop: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(cond_drop, bool) or not isinstance(cond_drop, int | float) or not 0 <= cond_drop <= 1:
            raise UsageError(f"module.cond_drop={cond_drop!r} must lie in [0, 1] (Ho & Salimans: 0.1 or 0.2)")
        if not 0.0 <= ema_decay < 1.0:
            raise UsageError(f"module.ema_decay={ema_decay} must be in [0, 1) (DDPM: 0.9999)")
        if max_bad_steps < 1:
            raise UsageError(f"module.max_bad_steps={max_bad_steps} must be >= 1")
        if lr_decay not in LR_DECAYS:
            raise UsageError(f"module.lr_decay={lr_decay!r}: choose one of {', '.join(LR_DECAYS)}")
        check_objective(prediction, loss_weight, snr_gamma, schedule)
        self.automatic_optimization = False
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.schedule = schedule
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.ema_decay = ema_decay
        self.grad_clip = grad_clip or None
        self.max_bad_steps = max_bad_steps
        self.fused = fused
        self.compile = compile
        self.config = config or {}
        self.prediction, self.loss_weight, self.snr_gamma = prediction, loss_weight, float(snr_gamma)
        self.cond_drop, self.num_classes = float(cond_drop), num_classes_of(model)
        self.skipped_steps = 0  # non-finite steps over the whole run (saved in checkpoints)
        self.bad_in_a_row = 0
        self._rng_state_to_restore: dict[str, Any] | None = None

    def configure_model(self) -> None:
        if self.compile:
            self.model.compile()  # in place: state_dict keys stay those of the plain module

    def setup(self, stage: str) -> None:
        self.schedule = self.schedule.to(self.device)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizer, lr_schedule = self.optimizers(), self.lr_schedulers()
        loss = self.training_loss(batch)
        self.manual_backward(loss)
        grad_norm = self.clip_and_check()
        finite = bool(torch.isfinite(grad_norm))  # the same on every rank: the gradients are all-reduced
        if not finite and self._grad_scaler() is None:
            optimizer.zero_grad(set_to_none=True)  # nothing to apply: the optimizer skips parameters without grads
        # Step either way (a skipped step updates nothing), so max_steps, the data stream and callbacks go on as usual;
        # under fp16 the GradScaler sees the inf itself, skips the update and lowers its scale.
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if finite:
            lr_schedule.step()
            self.on_finite_step()
            self.bad_in_a_row = 0
        else:
            self._count_bad_step(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/grad_norm", grad_norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/skipped_steps", float(self.skipped_steps))
        self.log_step(loss)
        return loss.detach()

    def training_loss(self, batch: Tensor | tuple[Tensor, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The loss of one batch: the network's prediction target under its weighting (DDPM's L_simple by default;
        a subclass such as ConsistencyModule brings its own); a labelled batch drops a `cond_drop` share of them."""
        x0, y = self.split(batch)
        if y is not None:
            y = drop_labels(y, self.cond_drop, self.num_classes, generator)
        return diffusion_loss(self.model, self.schedule, x0, prediction=self.prediction, weighting=self.loss_weight,
                              gamma=self.snr_gamma, generator=generator, y=y)  # fmt: skip

    def split(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(images, labels or None) of a batch; labels for a network that takes none (or none for one that needs
        them) are refused, naming the fix."""
        x0, y = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        if (y is None) != (self.num_classes is None):
            raise UsageError("the data yields labels and the network takes none, or the other way round: train with "
                             "conditional=true, which sets both the data and the model")  # fmt: skip
        return x0, y

    def eps_model(self, net: nn.Module) -> nn.Module:
        """`net` (the model or its EMA) as the eps-model every sampler takes (diffusion.wrappers.prediction)."""
        return net if self.prediction == "eps" else Prediction(net, self.schedule, self.prediction)

    def on_finite_step(self) -> None:
        """After an applied (finite) update: the EMA of the weights."""
        ema_update(self.ema, self.model, self.ema_decay)

    def log_step(self, loss: Tensor) -> None:
        """Extra per-step metrics of a subclass (none here)."""

    def clip_and_check(self) -> Tensor:
        """Clip the global gradient norm at `grad_clip` (if set) and return the norm before clipping (inf/nan if any
        gradient is). fp16 gradients still carry the GradScaler's scale, so the threshold is scaled alike. DDP's
        gradients are all-reduced and FSDP2's are DTensors that compute the global norm, so every rank gets the
        same norm and takes the same decision."""
        max_norm = self.grad_clip or float("inf")
        scaler = self._grad_scaler()
        scale = scaler.get_scale() if scaler is not None else 1.0
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm * scale)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm / scale

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _count_bad_step(self, loss: Tensor) -> None:
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        step = self.global_step
        rank_zero_warn(
            f"step {step}: non-finite loss or gradients (loss {loss.item():.4g}); skipped it, weights and EMA "
            f"untouched ({self.bad_in_a_row} in a row, {self.skipped_steps} in this run)"
        )
        if self.bad_in_a_row >= self.max_bad_steps:
            raise DivergenceError(
                f"training diverged: the loss or gradients were non-finite for {self.bad_in_a_row} steps in a row "
                f"(up to step {step}; none of them changed the weights). Try a lower optim.lr, a longer "
                "module.warmup_steps, module.grad_clip=1, or trainer.precision=bf16-mixed / 32-true instead of "
                "16-mixed, and continue with resume=<this run>/checkpoints/last.ckpt (it holds the last finite "
                "weights); module.max_bad_steps sets the patience"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        kwargs = {"fused": True} if self.fused else {}
        optimizer = self.optimizer(self.model.parameters(), **kwargs)
        warmup, total = max(1, self.warmup_steps), None
        if self.lr_decay == "cosine":
            total = self.trainer.max_steps if self._trainer is not None else -1
            if total is None or total < warmup:
                raise UsageError(f"module.lr_decay=cosine decays to 0 at trainer.max_steps, which is {total} "
                                 f"here: set it to at least module.warmup_steps={self.warmup_steps}")  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, warmup=warmup, total=total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        # The same t and noise at every validation, so the curve shows the model changing, not the draw.
        seed = 1_000_003 * batch_idx + self.global_rank
        x0, y = self.split(batch)  # the conditional loss, every label kept
        for name, net in (("val/loss", self.model), ("val/loss_ema", self.ema)):
            g = torch.Generator(self.device).manual_seed(seed)
            loss = diffusion_loss(net, self.schedule, x0, prediction=self.prediction, weighting=self.loss_weight,
                                  gamma=self.snr_gamma, generator=g, y=y)  # fmt: skip
            self.log(name, loss, sync_dist=True, batch_size=len(x0))

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, *, use_ema: bool = True, seed: int = 0) -> Tensor:
        """n images [n, C, H, W] in [-1, 1] from DDIM (eta = 0) with `steps` steps of sample.py's default spacing
        for DDIM: leading, or trailing (from T-1) under zero terminal SNR. A conditional network draws image i of
        class i % num_classes, unguided (sample.py's default labels)."""
        net = self.ema if use_ema else self.model
        if self.num_classes is not None:
            net = conditional_net(net, torch.arange(n, device=self.device) % self.num_classes)
        shape = self.config.get("image_shape") or _input_shape(net)
        g = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((n, *shape), generator=g, device=self.device)
        spacing = "trailing" if self.schedule.zero_terminal else "leading"
        ts = timesteps.make(spacing, min(steps, self.schedule.T), self.schedule)
        with torch.autocast(self.device.type, enabled=False):
            return ddim(self.eps_model(net), noise, self.schedule, ts).clamp(-1, 1)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.config
        checkpoint["rng_states"] = self._rng_states_of_all_ranks()  # a collective: every rank saves together
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout, t and the noise draw from the global RNG; put each rank's back where it was, just before the
        # first resumed step.
        self._rng_state_to_restore = checkpoint.get("rng_states")
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    def on_train_start(self) -> None:
        if self._rng_state_to_restore is not None:
            self._restore_rng_states(self._rng_state_to_restore)
            self._rng_state_to_restore = None
        else:  # Lightning re-seeds every DDP rank alike when it starts them; t, noise and dropout must differ per rank
            torch.manual_seed(int(self.config.get("seed", 0)) + 1 + self.global_rank)

    def _rng_states_of_all_ranks(self) -> dict[str, Tensor]:
        """{generator: [world_size, n] uint8}: row r is rank r's state, so that ranks keep drawing different t and
        noise after a resume."""
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        world = self.trainer.world_size
        if world == 1:
            return {name: state[None] for name, state in mine.items()}
        gathered = {}
        for name, state in mine.items():  # on the device (NCCL gathers GPU tensors only), as int32 (every backend)
            local = state.to(self.device, torch.int32)
            rows = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(rows, local)
            gathered[name] = torch.stack(rows).to("cpu", torch.uint8)
        return gathered

    def _restore_rng_states(self, states: dict[str, Tensor]) -> None:
        rank, world = self.global_rank, self.trainer.world_size
        cpu = states.get("cpu") if isinstance(states, dict) else None
        cpu = cpu[None] if isinstance(cpu, Tensor) and cpu.ndim == 1 else cpu  # older checkpoints: one state
        expected = torch.get_rng_state().shape
        if not isinstance(cpu, Tensor) or cpu.dtype != torch.uint8 or cpu.shape[1:] != expected:
            raise UsageError(  # set_rng_state crashes the process on a malformed state: refuse it instead
                f"the checkpoint's rng_states are not random-generator states of this torch ({expected[0]} bytes); "
                "was it written by train.py? Resume from another checkpoint"
            )
        if len(cpu) != world:
            seed = int(self.config.get("seed", 0)) + 1_000_003 * (self.global_step + 1) + rank
            rank_zero_warn(
                f"the checkpoint's random state comes from {len(cpu)} process(es), this run has {world}: each rank "
                "draws from a fresh seed, so the run continues correctly but not bit for bit as the original would"
            )
            torch.manual_seed(seed)
            return
        torch.set_rng_state(cpu[rank].clone())  # a row that starts at offset 0: set_rng_state reads the storage
        cuda = states.get("cuda")
        ok = isinstance(cuda, Tensor) and cuda.dtype == torch.uint8 and cuda.ndim == 2 and len(cuda) == world
        if self.device.type == "cuda" and ok and cuda.shape[1:] == torch.cuda.get_rng_state(self.device).shape:
            torch.cuda.set_rng_state(cuda[rank].clone(), self.device)


def _input_shape(net: nn.Module) -> tuple[int, int, int]:
    channels = getattr(net, "in_channels", 3)
    size = getattr(net, "resolution", 32)
    return channels, size, size
