"""The log-SNR ODE solvers (diffusion/sampling/dpm_solver.py, unipc.py): DPM-Solver++(2M, 3M) and UniPC against
diffusers' schedulers on the same timesteps to float64 precision, against the exact probability-flow ODE of Gaussian
data (convergence order), and the sampler contract (NFE = S, every step count, option checks)."""

import importlib
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from diffusion import sampling, schedule, timesteps
from diffusion.mixture import GaussianMixture

F64 = torch.float64
SCHEDULES = [schedule.linear(1000), schedule.cosine(1000)]
SOLVERS = {
    "dpm_solver": sampling.dpm_solver,
    "dpm_solver_3m": sampling.dpm_solver_3m,
    **{f"unipc{p}": partial(sampling.unipc, order=p) for p in (1, 2, 3)},
    **{f"unipc{p} bh1": partial(sampling.unipc, order=p, variant="bh1") for p in (1, 2, 3)},
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def separated_modes(dim: int = 6) -> GaussianMixture:
    means = torch.randn(4, dim, generator=gen(0), dtype=F64)
    return GaussianMixture(1.6 * means / means.norm(dim=1, keepdim=True), torch.tensor([0.4, 0.3, 0.2, 0.1]), 0.15)


# -------------------------------------------------------------------- diffusers' schedulers, same timesteps
class Float64(torch.Tensor):
    """A sample that stays float64 through diffusers' `sample.to(torch.float32)` (DPMSolverMultistepScheduler.step
    rounds each sample to float32), so the formulas are compared to float64 precision, not float32 rounding."""

    def to(self, *args, **kwargs):
        return self if args and args[0] is torch.float32 else super().to(*args, **kwargs)


def reference(scheduler, model, x, ts, sched, final_sigma: float = 0.0):
    """Run a diffusers scheduler on our timesteps, its sigmas taken from our float64 alpha_bar (diffusers keeps
    float32 ones), ending at sigma = final_sigma: 0 (final_sigmas_type="zero": clean data, as our last step), or
    t = 0's (the official codes' end)."""
    abar = sched.alphas_cumprod[ts]
    scheduler.timesteps = ts.clone()
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.tensor([final_sigma], dtype=F64)])
    y = x.clone().as_subclass(Float64)
    for t in ts.tolist():
        y = scheduler.step(model(y, torch.full((len(y),), t)), t, y).prev_sample
    return y.as_subclass(torch.Tensor)


STEPS = [1, 2, 3, 4, 5, 7, 10, 16, 40]


@pytest.mark.parametrize("sched", SCHEDULES, ids=str)
def test_dpm_solver_2m_and_3m_match_diffusers_to_float64_precision(sched):
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    model, x = separated_modes().model(sched), torch.randn(16, 6, dtype=F64, generator=gen(1))
    for steps in STEPS:
        ts = timesteps.logsnr(steps, sched)
        kept = partial(sampling.dpm_solver_3m, lower_order_final=False)
        # diffusers' lower_order_final=False: orders rise to `order` and only the step onto sigma = 0 is first order
        # (ours with lower_order_final=False); its default (True) also lowers the step before it to second order,
        # below 15 steps only (ours by default lowers it at every step count); for 2M the two settings are the same
        cases = {
            (sampling.dpm_solver, 2): (False, True),
            (kept, 3): (False, True) if steps >= 15 else (False,),
            (sampling.dpm_solver_3m, 3): (True,) if steps < 15 else (),
        }
        for (ours, order), settings in cases.items():
            got = ours(model, x, sched, ts)
            for lower_order_final in settings:
                ref = DPMSolverMultistepScheduler(
                    trained_betas=sched.betas.numpy(),
                    solver_order=order,
                    algorithm_type="dpmsolver++",
                    final_sigmas_type="zero",
                    lower_order_final=lower_order_final,
                )
                ref.set_timesteps(timesteps=ts.tolist())
                assert torch.allclose(got, reference(ref, model, x, ts, sched), atol=1e-11, rtol=0), (steps, order)
        two = sampling.dpm_solver(model, x, sched, ts)
        if steps >= 4:  # from the fourth step on the third order is used: not the same sampler as 2M
            assert not torch.allclose(kept(model, x, sched, ts), two)
        if steps >= 5:  # lowered, the third order is used from the fourth step up to the third-to-last
            assert not torch.allclose(sampling.dpm_solver_3m(model, x, sched, ts), two)
        if steps >= 15:  # diffusers no longer lowers there: ours differs from it (and from 3M kept) in that one step
            assert not torch.allclose(sampling.dpm_solver_3m(model, x, sched, ts), kept(model, x, sched, ts))


@pytest.mark.parametrize("sched", SCHEDULES, ids=str)
def test_the_official_ending_onto_t_0_differs_from_ours_by_sigma_0_times_the_noise(sched):
    """The official codes end a log-SNR grid with a first-order step onto t = 0 and return x there; ours returns the
    x0 of the last point (timesteps.LOGSNR_END). The two differ by alpha_0 and sigma_0 times the predicted noise."""
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    model, x = separated_modes().model(sched), torch.randn(64, 6, dtype=F64, generator=gen(2))
    abar_0 = float(sched.alphas_cumprod[0])
    for steps in (5, 10):  # below 15 steps diffusers' lower_order_final makes the last step first order, as official
        ts = timesteps.logsnr(steps, sched)
        ref = DPMSolverMultistepScheduler(trained_betas=sched.betas.numpy(), algorithm_type="dpmsolver++",
                                          final_sigmas_type="sigma_min")  # fmt: skip
        ref.set_timesteps(timesteps=ts.tolist())
        official = reference(ref, model, x, ts, sched, final_sigma=((1 - abar_0) / abar_0) ** 0.5)
        ours = sampling.dpm_solver(model, x, sched, ts)
        gap = (official - ours).pow(2).mean().sqrt()  # 0.1-0.5 sigma_0; x instead of x0 at 5 steps: 2.5-3.4 sigma_0
        assert 0 < gap < 2 * (1 - abar_0) ** 0.5, (steps, gap)  # sigma_0 = 0.01 (linear), 0.006 (cosine)
        # single values differ more than the RMS: up to 1.9 sigma_0 here, 3.7 sigma_0 (0.037) on the image mixture
        assert (official - ours).abs().max() > gap


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("sched", SCHEDULES, ids=str)
def test_unipc_matches_diffusers_to_float64_precision(sched, variant):
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    model, x = separated_modes().model(sched), torch.randn(16, 6, dtype=F64, generator=gen(1))
    for steps in STEPS:
        ts = timesteps.logsnr(steps, sched)
        outputs = []
        for order in (1, 2, 3):
            ref = UniPCMultistepScheduler(
                trained_betas=sched.betas.numpy(), solver_order=order, solver_type=variant, predict_x0=True
            )
            ref.set_timesteps(steps)  # then replaced by ours (set_timesteps takes no custom timesteps)
            got = sampling.unipc(model, x, sched, ts, order=order, variant=variant)
            last = reference(ref, model, x, ts, sched)
            if variant == "bh1":  # diffusers' last step onto sigma = 0 is NaN there (B(h) = h with h = inf); compare
                assert bool(last.isnan().all())  # the x0 it took at the last point, which is what that step returns
                last = ref.model_outputs[-1].as_subclass(torch.Tensor)
            assert torch.allclose(got, last, atol=1e-11, rtol=0), (steps, order)
            outputs.append(got)
        # the orders at step i are min(order, i + 1, S - i): 1 and 2 differ from S = 3 on, 2 and 3 from S = 5
        assert (steps >= 3) != torch.allclose(outputs[0], outputs[1]), steps
        assert (steps >= 5) != torch.allclose(outputs[1], outputs[2]), steps
        if variant == "bh1" and steps >= 3:  # B(h) only enters from the second order on
            assert not torch.allclose(outputs[1], sampling.unipc(model, x, sched, ts, order=2)), steps


# -------------------------------------------------------------------- the exact ODE of Gaussian data
MU, STD = torch.linspace(-0.5, 0.8, 8, dtype=F64), 0.3
# T = 100000 (betas scaled by 1000 / T): integer timesteps then sit on the log-SNR grid; at T = 1000 the grid's last
# steps (t = 0, 1, 2, ...) have a fixed size whatever S, an error floor that hides the order
FINE = [schedule.linear(100000, beta_start=1e-6, beta_end=2e-4), schedule.cosine(100000)]


def ode_error(sampler, sched, steps: int, x: torch.Tensor) -> float:
    """RMS distance between the sampler's output and the exact one: the probability-flow ODE carries N(sqrt(abar) mu,
    v I), v = abar s^2 + 1 - abar, along x_s = sqrt(abar_s) mu + sqrt(v_s / v_t) (x_t - sqrt(abar_t) mu), solved here
    exactly from the first timestep to t = 0, followed by the same final step onto clean data (the x0 at t = 0)."""
    abar = sched.alphas_cumprod

    def eps(x, t):  # E[eps | x_t] = sqrt(1 - abar) (x - sqrt(abar) mu) / v for Gaussian data
        a = abar[t].view(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)

    ts = timesteps.logsnr(steps, sched)
    abar_t, abar_0 = float(abar[ts[0]]), float(abar[0])
    v_t, v_0 = abar_t * STD**2 + 1 - abar_t, abar_0 * STD**2 + 1 - abar_0
    x_0 = abar_0**0.5 * MU + (v_0 / v_t) ** 0.5 * (x - abar_t**0.5 * MU)
    exact = (x_0 - (1 - abar_0) ** 0.5 * eps(x_0, torch.zeros(len(x), dtype=torch.int64))) / abar_0**0.5
    return float((sampler(eps, x, sched, ts) - exact).pow(2).mean().sqrt())


def slope(sampler, sched, steps: list[int]) -> float:
    """The order: minus the least-squares slope of log error against log S (the log-SNR step h is about 1/S)."""
    x = torch.randn(64, 8, dtype=F64, generator=gen(0))
    errors = [ode_error(sampler, sched, s, x) for s in steps]
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


ASYMPTOTIC = [40, 57, 80, 113, 160]


@pytest.mark.parametrize("sched", FINE, ids=str)
def test_each_solver_converges_to_the_exact_ode_at_its_order(sched):
    assert slope(sampling.ddim, sched, ASYMPTOTIC) == pytest.approx(1, abs=0.15)  # the harness sees DDIM's first order
    assert slope(sampling.dpm_solver, sched, ASYMPTOTIC) == pytest.approx(2, abs=0.15)
    assert slope(SOLVERS["unipc1"], sched, ASYMPTOTIC) == pytest.approx(2, abs=0.15)  # UniPC-p: order p + 1
    assert slope(SOLVERS["unipc2"], sched, ASYMPTOTIC) == pytest.approx(3, abs=0.15)
    # any B(h) = O(h) keeps UniPC's order (the paper's Theorem 3.1), B(h) = h as well; its slope nears p + 1 from
    # above more slowly (2.17 over 40-160 steps for p = 1 on cosine, 2.09 over 80-320)
    for p in (1, 2):
        assert slope(SOLVERS[f"unipc{p} bh1"], sched, [80, 113, 160, 226, 320]) == pytest.approx(p + 1, abs=0.15)
    # UniPC-3: a fourth-order main term and the third-order one of its first step (UniC-1) have opposite signs and
    # cancel near 40 (and 226) steps on these schedules: past the first crossing, it falls at least as fast as S^-3
    assert slope(SOLVERS["unipc3"], sched, [57, 80, 113, 160]) > 2.8
    # 3M: third order over the step counts it is used at; from ~50 steps its first (Euler) step's O(h^2) error,
    # tiny at that noise level, takes over and the slope falls towards 2 (diffusers' 3M does the same)
    assert slope(sampling.dpm_solver_3m, sched, [10, 14, 20, 28]) == pytest.approx(3, abs=0.25)
    assert 1.9 < slope(sampling.dpm_solver_3m, sched, [80, 113, 160]) < 2.4


@pytest.mark.parametrize("sched", FINE + SCHEDULES, ids=str)
def test_third_order_solvers_beat_2m_on_the_exact_ode(sched):
    x = torch.randn(64, 8, dtype=F64, generator=gen(0))
    # at 20 steps and fewer the log-SNR step (about 10 / S) is too long for the order to decide: 3M is up to 16%
    # behind 2M at 20 steps on the cosine schedule (T = 100000), UniPC-3 ahead of both from 14 steps on
    for steps in (28, 40, 57):
        dpm_2m = ode_error(sampling.dpm_solver, sched, steps, x)
        assert ode_error(sampling.dpm_solver_3m, sched, steps, x) < 0.8 * dpm_2m, steps
        assert ode_error(SOLVERS["unipc3"], sched, steps, x) < 0.5 * dpm_2m, steps


# -------------------------------------------------------------------- the sampler contract
@pytest.mark.parametrize("name", SOLVERS)
def test_nfe_is_s_for_every_step_count_each_timestep_once_in_order(name):
    sched, data = schedule.linear(100), separated_modes(dim=4)
    x = torch.randn(3, 4, dtype=F64, generator=gen(0))
    calls = []

    def model(x, t):
        assert t.dtype == torch.int64 and t.shape == (len(x),)
        calls.append(int(t[0]))
        return data.eps(x, t, sched)

    for steps in range(1, 21):
        calls.clear()
        ts = timesteps.logsnr(steps, sched)
        out = SOLVERS[name](model, x, sched, ts)
        assert calls == ts.tolist(), steps
        assert out.shape == x.shape and out.dtype == F64 and bool(out.isfinite().all())


@pytest.mark.parametrize("name", SOLVERS)
def test_a_one_point_distribution_comes_back_exactly(name):
    sched = schedule.cosine(1000)
    x_star = torch.linspace(-0.9, 0.9, 12, dtype=F64).view(1, 3, 2, 2)
    model = GaussianMixture(x_star, torch.ones(1), 0.0).model(sched)
    for steps in (1, 2, 3, 5, 13):
        out = SOLVERS[name](
            model, torch.randn(4, 3, 2, 2, dtype=F64, generator=gen(0)), sched, timesteps.logsnr(steps, sched)
        )
        assert torch.allclose(out, x_star.expand_as(out), atol=1e-8, rtol=0)


def test_clip_is_off_by_default_and_bounds_x0_when_asked():
    sched = schedule.linear(100)
    model = GaussianMixture(torch.full((1, 2), 3.0, dtype=F64), torch.ones(1), 0.0).model(
        sched
    )  # data at 3, not in [-1, 1]
    x, ts = torch.randn(5, 2, dtype=F64, generator=gen(0)), timesteps.logsnr(10, sched)
    for name, sampler in SOLVERS.items():
        assert torch.allclose(sampler(model, x, sched, ts), torch.full_like(x, 3.0), atol=1e-8), name
        assert float(sampler(model, x, sched, ts, clip=True).abs().max()) <= 1.0, name


def test_bad_order_or_variant_is_refused():
    sched = schedule.linear(100)
    model, x, ts = separated_modes(dim=2).model(sched), torch.randn(2, 2, dtype=F64), timesteps.logsnr(5, sched)
    for order in (0, 4, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
            sampling.unipc(model, x, sched, ts, order=order)
    for variant in ("bh3", "BH1", "", None, 1):
        with pytest.raises(ValueError, match="variant must be 'bh1'"):
            sampling.unipc(model, x, sched, ts, variant=variant)


def test_each_solver_is_one_object_under_both_names_and_imports_alone():
    """diffusion.sampling.unipc (what conf/sampler names) is the function of diffusion/sampling/unipc.py; each file
    imports without the others (the old samplers and solvers modules reached into each other)."""
    for name, file in (("dpm_solver", "dpm_solver"), ("dpm_solver_3m", "dpm_solver"), ("unipc", "unipc")):
        assert getattr(sampling, name) is getattr(importlib.import_module(f"diffusion.sampling.{file}"), name)
    code = "import importlib; print(importlib.import_module('diffusion.sampling.unipc').unipc.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "diffusion.sampling.unipc" in out.stdout, out.stderr
