"""What the network predicts and how the loss weighs it, against closed forms.

- The exact x0- and v-predictors of a Gaussian mixture, wrapped (diffusion.wrappers.prediction), give every sampler
  the samples of the exact eps-predictor, to float64 rounding, at 5, 10 and 50 steps: no sampler knows the target.
- Under zero terminal SNR (alpha_bar = 0 at T-1) the first step from pure noise with the exact v-predictor lands where
  the closed form says (x0 = -v = E[x0] there), and PNDM, which cannot take that step, refuses it.
- Min-SNR: each target's weighted MSE equals the min(SNR, gamma)-weighted x0 error, finite at both ends of every
  schedule.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from benchmarks.mixture_testbed import image_mixture
from diffusion import sampling, timesteps
from diffusion import schedule as S
from diffusion.errors import UsageError
from diffusion.sampling import analytic
from diffusion.training.losses import loss_weight
from diffusion.wrappers.prediction import Prediction
from sample import sample
from train import train

from .conftest import TINY_RUN, compose_config

F64 = torch.float64
DATA = image_mixture(image_size=4, channels=2, num_modes=3, std=0.2)
SCHEDULES = [S.linear(1000), S.cosine(1000)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_gamma(schedule: S.Schedule) -> torch.Tensor:
    return analytic.estimate_gamma(DATA.model(schedule), DATA.sample(200, gen(5)), schedule, batch_size=20000,
                                   generator=gen(6))  # fmt: skip


SAMPLERS = {
    "ddpm": sampling.ddpm, "ddim": sampling.ddim, "ddim eta=0.5": functools.partial(sampling.ddim, eta=0.5),
    "pndm": sampling.pndm, "s_pndm": sampling.s_pndm, "plms": sampling.plms, "dpm_solver": sampling.dpm_solver,
    "dpm_solver_3m": sampling.dpm_solver_3m, "unipc": sampling.unipc,
    "unipc bh1": functools.partial(sampling.unipc, variant="bh1"), "analytic_ddpm": sampling.analytic_ddpm,
    "analytic_ddim": sampling.analytic_ddim,
}  # fmt: skip


@pytest.mark.parametrize("sched", SCHEDULES, ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_wrapped_x0_and_v_predictors_sample_as_the_eps_predictor(name, sched):
    sampler = SAMPLERS[name]
    if "analytic" in name:  # the eps-model's Gamma: the same model seen three ways has one Gamma
        sampler = functools.partial(sampler, gamma=exact_gamma(sched), clip=False, data_var=1.0)
    elif name != "ddim eta=0.5":
        sampler = functools.partial(sampler, clip=False)
    x = torch.randn(64, *DATA.shape, dtype=F64, generator=gen(1))
    spacing = timesteps.paper_spacing(SAMPLERS[name])[0]  # each its own: PNDM from T-1 diverges on the cosine one
    for steps in (5, 10, 50):
        ts = timesteps.make(spacing, steps, sched)
        reference = sampler(DATA.model(sched), x, sched, ts, generator=gen(2))
        for target in ("x0", "v"):
            wrapped = Prediction(DATA.predictor(sched, target), sched, target)
            got = sampler(wrapped, x, sched, ts, generator=gen(2))
            gap = ((got - reference).abs() / (1 + reference.abs())).max()  # float64 rounding, relative past |x| = 1
            assert gap < 1e-9, (target, steps, gap)


ZERO = S.linear(1000, zero_terminal_snr=True)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "dpm_solver_3m", "unipc", "analytic_ddim"])
def test_the_first_step_from_pure_noise_lands_where_the_closed_form_says(name):
    """Two steps, T-1 then s: from x_T (alpha_bar = 0) the step must land on sqrt(abar_s) E[x0] + sqrt(1 - abar_s)
    x_T (x0 = -v = E[x0], eps = x_T there; Analytic-DDIM adds noise of variance abar_s Var[x0], Var[x0] <= its
    bound, as x_T tells nothing about x0), and the step from s onto clean data returns E[x0 | x_s], the closed form;
    x0 from eps would divide by sqrt(alpha_bar) = 0 there."""
    x_T = torch.randn(32, *DATA.shape, dtype=F64, generator=gen(3))
    s = 400
    mean = (DATA.weights @ DATA.means.reshape(len(DATA.means), -1)).reshape(DATA.shape)
    abar_s = float(ZERO.alphas_cumprod[s])
    x_s = abar_s**0.5 * mean + (1 - abar_s) ** 0.5 * x_T
    sampler = functools.partial(SAMPLERS[name], clip=False)
    if name == "analytic_ddim":  # eta = 0, bound data_var = 1: sigma*^2 = abar_s, its noise drawn from the generator
        sampler = functools.partial(sampler, gamma=torch.ones(1000, dtype=F64), data_var=1.0, noise_cap=None)
        x_s = x_s + abar_s**0.5 * torch.randn(x_T.shape, generator=gen(4), dtype=F64)
    model = Prediction(DATA.predictor(ZERO, "v"), ZERO, "v")
    got = sampler(model, x_T, ZERO, torch.tensor([999, s]), generator=gen(4))
    expected = DATA.x0(x_s, torch.full((32,), s), ZERO)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-9, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["pndm", "s_pndm", "plms"])
def test_pndm_refuses_to_start_where_alpha_bar_is_zero(name):
    model = Prediction(DATA.predictor(ZERO, "v"), ZERO, "v")
    x_T = torch.randn(4, *DATA.shape, dtype=F64, generator=gen(3))
    with pytest.raises(ValueError, match="PNDM's transfer divides by sqrt\\(alpha_bar\\), which is 0 at this start"):
        SAMPLERS[name](model, x_T, ZERO, timesteps.trailing(10, 1000))


def test_the_zero_terminal_snr_rescaling_is_lin_et_als():
    """alpha_bar exactly 0 at T-1, sqrt(alpha_bar) at t = 0 kept, and sqrt(alpha_bar) an affine map of the
    original (Lin et al. 2024, Algorithm 1), for every schedule; the schedule says so."""
    for build in (S.linear, S.cosine, S.quadratic, S.sigmoid):
        plain, zero = build(1000), build(1000, zero_terminal_snr=True)
        assert zero.zero_terminal and not plain.zero_terminal and float(zero.alphas_cumprod[-1]) == 0.0
        a, b = plain.alphas_cumprod.sqrt(), zero.alphas_cumprod.sqrt()
        assert torch.allclose(a[0], b[0], rtol=1e-12)
        affine = (a - a[-1]) * a[0] / (a[0] - a[-1])
        assert torch.allclose(b, affine, atol=1e-12)


# ---------------------------------------------------------------- the weights


@pytest.mark.parametrize(
    "prediction, sched",
    [(p, s) for s in [*SCHEDULES, ZERO] for p in ("eps", "x0", "v") if not (p == "eps" and s.zero_terminal)],
    ids=str,
)  # eps-prediction under zero terminal SNR is refused (it says nothing about x0 at T-1): module tests
def test_min_snr_weights_make_each_targets_loss_the_min_snr_weighted_x0_error(prediction, sched):
    """weight(target) |out - target|^2 = min(SNR, gamma) |x0_hat - x0|^2 for random x0, eps and network outputs, at
    timesteps from the first to the last (where SNR is ~1e4 and ~4e-5, or 0 under zero terminal SNR)."""
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    abar = sched.alpha_bar(t).view(-1, 1)
    x0, eps, out = (torch.randn(len(t), 12, dtype=F64, generator=gen(i)) for i in range(3))
    x_t = S.x_at(x0, eps, abar)
    snr = (abar / (1 - abar)).view(-1)
    for gamma in (1.0, 5.0):
        weight = loss_weight(prediction, "min_snr", snr, gamma)
        ours = weight * (out - S.target(prediction, x0, eps, abar)).pow(2).sum(1)
        x0_error = snr.clamp(max=gamma) * (S.x0_of(prediction, out, x_t, abar) - x0).pow(2).sum(1)
        assert torch.isfinite(weight).all() and (weight >= 0).all()
        assert torch.allclose(ours, x0_error, rtol=1e-8, atol=1e-12), (ours, x0_error)
    assert torch.equal(loss_weight(prediction, "uniform", snr), torch.ones_like(snr))


def test_the_weights_are_finite_at_both_ends_for_every_target():
    snr = torch.tensor([0.0, 1e-12, 1.0, 1e12, float("inf")], dtype=F64)
    for prediction in ("eps", "x0", "v"):
        weight = loss_weight(prediction, "min_snr", snr, 5.0)
        assert torch.isfinite(weight[:-1]).all() and (weight[:-1] >= 0).all(), (prediction, weight)
    assert loss_weight("eps", "min_snr", snr, 5.0)[0] == 1  # min(SNR, gamma) / SNR -> 1 as SNR -> 0
    assert loss_weight("v", "min_snr", snr, 5.0)[0] == 0  # the x0 error at pure noise counts for nothing


# ---------------------------------------------------------------- train.py and sample.py

RUNS = {
    "v, min-SNR": ["module.prediction=v", "module.loss_weight=min_snr"],
    "x0, uniform": ["module.prediction=x0"],
    "v, zero terminal SNR": ["module.prediction=v", "schedule.zero_terminal_snr=true", "module.loss_weight=min_snr"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 3-step run of each objective: its last.ckpt."""
    root = tmp_path_factory.mktemp("objectives")
    out = {}
    for i, (name, overrides) in enumerate(RUNS.items()):
        train(compose_config("train", [*TINY_RUN, "trainer.max_steps=3", *overrides], root / str(i)))
        out[name] = root / str(i) / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.parametrize("name", RUNS)
def test_every_objective_trains_checkpoints_resumes_and_samples(name, runs, tmp_path, capsys):
    """The checkpoint records the objective, so sample.py needs nothing repeated, and resume continues it."""
    from diffusion.io import checkpoints

    config = checkpoints.load(runs[name])["config"]
    assert config["module"]["prediction"] == RUNS[name][0].split("=")[1]
    model, schedule = checkpoints.load_model(checkpoints.load(runs[name]))
    assert isinstance(model, Prediction) and model.prediction == config["module"]["prediction"]
    assert schedule.zero_terminal == ("zero" in name)
    for sampler in ("ddim", "dpm_solver", "unipc"):
        overrides = [f"ckpt={runs[name]}", "logger=none", "n_samples=2", "steps=4", f"sampler={sampler}"]
        images = sample(compose_config("sample", overrides, tmp_path / sampler))
        assert images.shape == (2, 32, 32, 3)
    if "zero" in name:  # the sampler's own spacing gives way to one from T-1, and says which
        assert (
            "4 trailing steps (the sampler's own: from T-1, pure noise under zero terminal SNR"
            in capsys.readouterr().out
        )
    resumed = train(
        compose_config("train", [f"resume={runs[name]}", "trainer.max_steps=5", "logger=csv"], tmp_path / "r")
    )
    assert resumed.global_step == 5 and resumed.prediction == config["module"]["prediction"]


def test_pndm_on_a_zero_terminal_snr_checkpoint_is_refused_before_sampling(runs, tmp_path):
    overrides = [f"ckpt={runs['v, zero terminal SNR']}", "logger=none", "n_samples=2", "steps=4", "sampler=pndm"]
    with pytest.raises(UsageError, match="sampler options: PNDM's transfer divides by sqrt"):
        sample(compose_config("sample", overrides, tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["schedule.zero_terminal_snr=true"],
            "zero_terminal_snr=true with module.prediction=eps.*use module.prediction=v",
        ),
        (["module.prediction=score"], "module.prediction='score': choose one of eps, x0, v"),
        (["module.loss_weight=p2"], "module.loss_weight='p2': choose one of uniform, min_snr"),
        (["module.snr_gamma=0"], "module.snr_gamma=0: use a number > 0"),
    ],
)
def test_bad_objectives_are_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(UsageError, match=message) as error:
        train(compose_config("train", [*TINY_RUN, *overrides], tmp_path))
    assert "\n" not in str(error.value)


def test_resuming_with_another_target_is_refused(runs, tmp_path):
    overrides = [f"resume={runs['x0, uniform']}", "module.prediction=v"]
    with pytest.raises(UsageError, match="module.prediction: the run has 'x0', the command line asks for 'v'"):
        train(compose_config("train", overrides, tmp_path))


def test_deepcache_and_skip_tuning_wrap_a_v_network_inside_its_conversion(runs, tmp_path):
    """DeepCache at interval 1 and Skip-Tuning at rho = 1 are the plain network: around a v-network too (they wrap
    the UNet, the v -> eps conversion wraps them), the images are the plain run's bit for bit."""
    common = [f"ckpt={runs['v, min-SNR']}", "logger=none", "n_samples=2", "steps=4", "sampler=ddim"]
    plain = sample(compose_config("sample", common, tmp_path / "plain"))
    cached = sample(compose_config("sample", [*common, "cache=deepcache", "cache.interval=1"], tmp_path / "cache"))
    skipped = sample(compose_config("sample", [*common, "skip=tuning", "skip.rho_top=1", "skip.rho_bottom=1"],
                                    tmp_path / "skip"))  # fmt: skip
    assert (plain == cached).all() and (plain == skipped).all()


def test_a_v_teacher_distils_into_a_v_student_that_samples(runs, tmp_path):
    from diffusion.io import checkpoints

    teacher = runs["v, min-SNR"]
    cd = [o for o in TINY_RUN if not o.startswith("experiment=")] + [
        "experiment=cd", "data=synthetic", "model=unet_tiny", "data.image_size=32", f"teacher={teacher}",
        "trainer.max_steps=2", "callbacks.samples_2.n=4", "callbacks.samples.steps=1"]  # fmt: skip
    train(compose_config("train", cd, tmp_path / "cd"))
    student = tmp_path / "cd" / "checkpoints" / "last.ckpt"
    assert checkpoints.load(student)["config"]["module"]["prediction"] == "v"  # the student is the teacher's kind
    overrides = [f"ckpt={student}", "logger=none", "n_samples=2", "steps=2", "sampler=consistency"]
    assert sample(compose_config("sample", overrides, tmp_path / "s")).shape == (2, 32, 32, 3)
    with pytest.raises(UsageError, match=r"module.prediction=eps \(the teacher predicts v\)"):
        train(compose_config("train", [*cd, "module.prediction=eps"], tmp_path / "contradicts"))
