"""Training: the DDPM "simple" loss, the EMA update, and the LightningModule that ties them to a UNet."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import samplers, timesteps
from .schedule import Schedule

__all__ = ["eps_loss", "ema_update", "DiffusionModule"]


def eps_loss(model: nn.Module, schedule: Schedule, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """L_simple of Ho et al. (eq. 14): t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), MSE(eps, model(x_t, t))."""
    t = torch.randint(0, schedule.T, (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return F.mse_loss(model(schedule.q_sample(x0, t, noise), t).float(), noise.float())


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


class DiffusionModule(L.LightningModule):
    """A noise-prediction network, its EMA copy and the DDPM training loop.

    Args:
        model: the network, `model(x_t, t) -> eps`.
        schedule: the noise schedule the network is trained under.
        optimizer: a partial optimizer, `optimizer(params) -> torch.optim.Optimizer` (Hydra's `_partial_`).
        warmup_steps: linear learning-rate warm-up from 0 (DDPM used 5000).
        ema_decay: decay of the weight average used for sampling (DDPM: 0.9999).
        compile: wrap the network's forward in `torch.compile`.
        config: the run's resolved config, stored in every checkpoint so sampling needs nothing else.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        compile: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.schedule = schedule
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.compile = compile
        self.config = config or {}
        self._rng_state_to_restore: dict[str, Any] | None = None

    def configure_model(self) -> None:
        if self.compile:
            self.model.compile()  # in place: state_dict keys stay those of the plain module

    def setup(self, stage: str) -> None:
        self.schedule = self.schedule.to(self.device)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = eps_loss(self.model, self.schedule, batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update(self.ema, self.model, self.ema_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        fused = self.device.type == "cuda"
        try:
            optimizer = self.optimizer(self.model.parameters(), fused=fused)
        except TypeError:  # an optimizer without a fused implementation
            optimizer = self.optimizer(self.model.parameters())
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        # The same t and noise at every validation, so the curve shows the model changing, not the draw.
        seed = 1_000_003 * batch_idx + self.global_rank
        for name, net in (("val/loss", self.model), ("val/loss_ema", self.ema)):
            g = torch.Generator(self.device).manual_seed(seed)
            self.log(name, eps_loss(net, self.schedule, batch, generator=g), sync_dist=True, batch_size=len(batch))

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, *, use_ema: bool = True, seed: int = 0) -> Tensor:
        """n images [n, C, H, W] in [-1, 1] from DDIM (eta = 0) with `steps` leading-spaced steps."""
        net = self.ema if use_ema else self.model
        shape = self.config.get("image_shape") or _input_shape(net)
        g = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((n, *shape), generator=g, device=self.device)
        ts = timesteps.leading(min(steps, self.schedule.T), self.schedule.T)
        with torch.autocast(self.device.type, enabled=False):
            return samplers.ddim(net, noise, self.schedule, ts).clamp(-1, 1)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.config
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from the global RNG; put it back where it was, just before the first resumed step.
        self._rng_state_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self._rng_state_to_restore is not None:
            _set_rng_states(self._rng_state_to_restore)
            self._rng_state_to_restore = None


def _input_shape(net: nn.Module) -> tuple[int, int, int]:
    channels = getattr(net, "in_channels", 3)
    size = getattr(net, "resolution", 32)
    return channels, size, size


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
