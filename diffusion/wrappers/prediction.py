"""A network that predicts x0 or v, as the `model(x, t) -> eps` every sampler takes (and the eps of one that predicts
eps, unchanged).

`Prediction(net, schedule, "v")(x, t)` is the eps the network's v implies (diffusion.schedule.eps_of); its `predict`
gives eps and x0 together, exactly: where alpha_bar = 0 (the first step of a zero-terminal-SNR schedule) x0 = -v,
which no eps can say (x0 from eps divides by sqrt(alpha_bar)). Samplers take both through
diffusion.sampling.core.denoise and never learn what the network predicts: PNDM combines eps, never raw v outputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..schedule import PREDICTIONS, Schedule, eps_of, x0_of

__all__ = ["Prediction", "around", "inner"]


class Prediction(nn.Module):
    """`net(x, t)` predicting `prediction` (eps, x0 or v) under `schedule`, as an eps-model with an exact x0."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.in_channels = getattr(net, "in_channels", None)
        self.resolution = getattr(net, "resolution", None)

    def predict(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(eps, x0) of the network at x_t = x [B, C, H, W], t int64 [B]; in x's dtype, the arithmetic in it too."""
        out = self.net(x, t).to(x.dtype)
        abar = self.schedule.alpha_bar(t).to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return eps_of(self.prediction, out, x, abar), x0_of(self.prediction, out, x, abar)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.predict(x, t)[0]

    def extra_repr(self) -> str:
        return f"prediction={self.prediction}"


def inner(model: nn.Module) -> nn.Module:
    """The network inside a Prediction wrapper (the model itself otherwise): what DeepCache and Skip-Tuning wrap."""
    return model.net if isinstance(model, Prediction) else model


def around(model: nn.Module, net: nn.Module) -> nn.Module:
    """`net` (e.g. DeepCache around model's network) predicting what `model` predicts: wrapped alike."""
    return Prediction(net, model.schedule, model.prediction) if isinstance(model, Prediction) else net
