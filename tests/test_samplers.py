"""Samplers against closed forms: for data that is one point x*, the exact eps is known in closed form."""

import pytest
import torch

from diffusion import samplers, schedule, timesteps


def point_model(x_star: torch.Tensor, sched: schedule.Schedule):
    """The optimal noise predictor when the data distribution is the single point x_star."""

    def model(x, t):
        abar = sched.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x_star) / (1 - abar).sqrt()

    return model


@pytest.mark.parametrize("spacing", sorted(timesteps.SPACINGS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_a_point_for_any_timesteps(spacing, eta):
    sched = schedule.linear(1000)
    x_star = torch.linspace(-0.9, 0.9, 3 * 4 * 4, dtype=torch.float64).view(1, 3, 4, 4)
    noise = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = timesteps.SPACINGS[spacing](7, sched.T)
    x0 = samplers.ddim(
        point_model(x_star, sched), noise, sched, ts, eta=eta, clip=False, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(x0, x_star.expand_as(x0), atol=1e-6)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    sched = schedule.cosine(100)
    model = point_model(torch.zeros(1, 1, 2, 2), sched)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ts = timesteps.leading(10, sched.T)

    def run(eta, seed):
        # stop before the last step so the result still carries the sampler's noise
        return samplers.ddim(model, noise, sched, ts[:-1], eta=eta, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_timesteps_are_descending_in_range():
    for name, spacing in timesteps.SPACINGS.items():
        for steps in (1, 10, 50):
            ts = spacing(steps, 1000)
            assert ts.dtype == torch.int64 and len(ts) == steps, name
            assert bool((ts[:-1] > ts[1:]).all()) and 0 <= ts.min() and ts.max() <= 999, name
    assert timesteps.leading(10, 1000).tolist() == list(range(900, -1, -100))
    assert timesteps.trailing(10, 1000).tolist() == list(range(999, 0, -100))
    with pytest.raises(ValueError, match="between 1 and T"):
        timesteps.leading(0, 1000)
    with pytest.raises(ValueError, match="between 1 and T"):
        timesteps.linspace(1001, 1000)
