"""Consistency models: the boundary condition, the losses against closed forms (an exact teacher and the exact ODE
solution map on a Gaussian mixture), the target EMA and the curriculum, PCM with one phase = CD, the sampler."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from diffusion import sampling, timesteps
from diffusion.mixture import GaussianMixture
from diffusion.sampling import consistency as cm
from diffusion.schedule import cosine, linear
from diffusion.training import losses
from diffusion.training.module import ema_update

T = 100
SCHEDULE = linear(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)  # the DDPM schedule's alpha_bar range at T = 100
DATA = GaussianMixture(torch.tensor([[1.0, 0.5], [-1.0, -0.5], [0.2, -1.0]]), torch.tensor([1.0, 2.0, 3.0]), 0.1)


class MLP(nn.Module):
    """A tiny eps-network for 2-D data: [x, sin/cos(t)] -> eps."""

    def __init__(self, dim: int = 2, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))  # fmt: skip

    def forward(self, x, t):
        phase = (t.float() + 1) / T * math.pi / 2
        return self.net(torch.cat([x, phase.sin()[:, None], phase.cos()[:, None]], 1))


class Teacher(nn.Module):
    """The exact eps of DATA plus a learnable residual that starts at 0: a student initialised from the teacher."""

    def __init__(self) -> None:
        super().__init__()
        self.residual = MLP()
        nn.init.zeros_(self.residual.net[-1].weight)
        nn.init.zeros_(self.residual.net[-1].bias)

    def forward(self, x, t):
        return DATA.eps(x, t, SCHEDULE) + self.residual(x, t)


def ode_map(x, t):
    """The exact consistency function: the exact teacher's probability-flow ODE from each t to clean data, in
    DPM-Solver++(2S) steps of one timestep (checked against many sampling.dpm_solver steps below)."""
    x, t = x.double().clone(), t.clone()
    while bool((t >= 0).any()):
        rows = t >= 0
        x[rows] = losses.dpm_solver_step(DATA.model(SCHEDULE), SCHEDULE, x[rows], t[rows], t[rows] - 1)
        t[rows] -= 1
    return x


def test_the_exact_map_is_the_ode_endpoint():
    x_T = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = sampling.dpm_solver(DATA.model(SCHEDULE), x_T, SCHEDULE, timesteps.logsnr(T, SCHEDULE), clip=False)
    # the two routes differ by their last, first-order step onto clean data (from t = 0) only
    assert (ode_map(x_T, torch.full((256,), T - 1)) - reference).abs().max() < 2e-2


# ---------------------------------------------------------------- the parameterization


def test_boundary_condition_holds_exactly():
    t = torch.arange(-1, T)
    c_skip, c_out = cm.boundary(t)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert bool((c_skip[1:] < 0.01).all()) and bool((c_out[1:] > 0.99).all())
    assert torch.allclose(c_skip**2 + c_out**2 * 4 * 0.25, c_skip**2 + c_out**2)  # both in [0, 1]
    x = torch.randn(5, 2)
    net = lambda x, t: torch.full_like(x, float("nan"))  # noqa: E731  (unused at the edge, even if broken)
    for edge in (-1, 9, 49):
        at = torch.full((5,), edge)
        assert torch.equal(cm.consistency(net, SCHEDULE, x, at, edge), x)
        c_skip, c_out = cm.boundary(at, edge)
        assert c_skip.eq(1).all() and c_out.eq(0).all()


def test_consistency_of_the_exact_teacher_is_its_x0_prediction_off_the_boundary():
    x, t = torch.randn(64, 2, dtype=torch.float64), torch.randint(0, T, (64,))
    x0 = SCHEDULE.predict_x0(x, t, DATA.eps(x, t, SCHEDULE))
    c_skip, c_out = (c[:, None] for c in cm.boundary(t))
    assert torch.allclose(cm.consistency(DATA.model(SCHEDULE), SCHEDULE, x, t), c_skip * x + c_out * x0)


def test_the_model_wrapper_returns_the_eps_that_carries_x_to_f():
    for phases in (1, 2, 4):
        model = cm.ConsistencyModel(Teacher().double(), SCHEDULE, phases)
        x, t = torch.randn(64, 2, dtype=torch.float64), torch.randint(0, T, (64,))
        edge = cm.edge_below(t, model.edges)
        assert bool((edge < t).all())
        abar_t, abar_e = (SCHEDULE.alpha_bar(v)[:, None] for v in (t, edge))
        x0 = (x - (1 - abar_t).sqrt() * model(x, t)) / abar_t.sqrt()
        landed = abar_e.sqrt() * x0 + (1 - abar_e).sqrt() * model(x, t)  # the DDIM step to the edge
        assert torch.allclose(landed, model.consistency(x, t), atol=1e-9)


def test_grid_and_phase_edges():
    assert cm.grid(4, 100).tolist() == [-1, 24, 49, 74, 99]
    assert cm.grid(100, 100).tolist() == list(range(-1, 100))
    assert cm.phase_edges(1, 100).tolist() == [-1] and cm.phase_edges(4, 100).tolist() == [-1, 24, 49, 74]
    assert cm.edge_below(torch.tensor([0, 24, 25, 49, 99]), cm.phase_edges(4, 100)).tolist() == [-1, -1, 24, 24, 74]
    for N in range(1, 101):  # sampling at S steps visits grid points whenever S divides N
        for S in (1, 2, 4):
            if N % S == 0:
                assert set(timesteps.trailing(S, 100).tolist()) <= set(cm.grid(N, 100).tolist())


def test_karras_grid_follows_its_formula():
    """Song et al. 2023's discretization in our VE noise level s_t = sigma_t / alpha_t: each point within one timestep
    of s_i = (s_0^(1/7) + i/(N-1) (s_{T-1}^(1/7) - s_0^(1/7)))^7 where no two round alike; N + 1 distinct points from
    -1 to T-1 for every N (N = T: every timestep); the uniform grid by name."""
    for sched in (SCHEDULE, linear(1000), cosine(1000)):
        s = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
        for N in (*range(1, 41), sched.T // 2, sched.T - 1, sched.T):
            ts = cm.karras(N, sched)
            assert len(ts) == N + 1 and ts[0] == -1 and ts[-1] == sched.T - 1 and bool((ts.diff() > 0).all()), N
        assert cm.karras(sched.T, sched).tolist() == list(range(-1, sched.T))
    sched = linear(1000)
    s = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    for N in (2, 5, 10, 18):
        ts, i = cm.karras(N, sched)[1:], torch.arange(N, dtype=torch.float64)
        target = (s[0] ** (1 / 7) + i / (N - 1) * (s[-1] ** (1 / 7) - s[0] ** (1 / 7))) ** 7
        below, above = s[(ts - 1).clamp(min=0)], s[(ts + 1).clamp(max=999)]
        assert bool((below <= target * (1 + 1e-9)).all() and (target <= above * (1 + 1e-9)).all()), (N, ts)
    assert cm.karras(18, sched)[:4].tolist() == [-1, 0, 5, 21]  # dense near the data: s = 0.010, 0.030, 0.083
    assert torch.equal(cm.make_grid("uniform", 10, sched), cm.grid(10, 1000))
    with pytest.raises(ValueError, match="unknown consistency grid"):
        cm.make_grid("edm", 10, sched)
    with pytest.raises(ValueError, match="N <= T"):
        cm.karras(T + 1, SCHEDULE)


# ---------------------------------------------------------------- teacher solvers


def test_teacher_steps_follow_the_ode():
    """One step of 10 timesteps: both solvers exact on single-point data (whose ODE is DDIM's straight line); on the
    mixture, DPM-Solver++(2S) lands closer to the exact ODE than DDIM (measured through the exact map)."""
    t, s = torch.full((256,), 59), torch.full((256,), 49)
    z = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    point = GaussianMixture(torch.tensor([[0.3, -0.7]]), torch.tensor([1.0]), 0.0)
    x_t, x_s = (SCHEDULE.q_sample(point.means.expand(256, 2), u, z) for u in (t, s))
    for solver in losses.SOLVERS.values():
        assert torch.allclose(solver(point.model(SCHEDULE), SCHEDULE, x_t, t, s), x_s, atol=1e-9)
    x = SCHEDULE.q_sample(DATA.sample(256, generator=torch.Generator().manual_seed(1)), t, z)
    exact = ode_map(x, t)
    err = {name: (ode_map(solver(DATA.model(SCHEDULE), SCHEDULE, x, t, s), s) - exact).pow(2).mean().sqrt().item()
           for name, solver in losses.SOLVERS.items()}  # fmt: skip
    assert err["dpm_solver"] < 0.5 * err["ddim"] and err["ddim"] < 0.1, err


# ---------------------------------------------------------------- losses


def cd(f, f_target, seed=0, **kw):
    x0 = DATA.sample(128, generator=torch.Generator().manual_seed(seed))
    kw = {"N": T, **kw}
    return losses.cd_loss(
        f, f_target, DATA.model(SCHEDULE), SCHEDULE, x0, generator=torch.Generator().manual_seed(1), **kw
    )


def test_cd_loss_of_the_exact_ode_map_is_zero_and_of_the_teacher_is_not():
    """With the exact teacher, the exact ODE map's CD loss is the teacher step's local error only: ~0 on the full
    grid (N = T), far below the teacher-initialised student's, and shrinking fast with the step."""
    perfect = lambda x, t, edge: ode_map(x, t)  # noqa: E731
    teacher = partial(cm.consistency, DATA.model(SCHEDULE), SCHEDULE)
    exact, naive, coarse = cd(perfect, perfect).item(), cd(teacher, teacher).item(), cd(perfect, perfect, N=10).item()
    assert exact < 1e-2 * naive and exact < 1e-2 * coarse and naive > 1e-5, (exact, naive, coarse)


def test_one_cd_step_with_the_exact_teacher_lowers_the_loss():
    torch.manual_seed(0)
    student = Teacher().double()
    target = copy.deepcopy(student).requires_grad_(False)
    f, f_target = partial(cm.consistency, student, SCHEDULE), partial(cm.consistency, target, SCHEDULE)
    # x0 = (x - sigma eps) / alpha multiplies eps's gradient by up to sigma / alpha = 150 here: a small step
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4)
    before = cd(f, f_target, N=10)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = cd(f, f_target, N=10)
    assert after.item() < before.item() - 1e-6, (after.item(), before.item())


def test_pcm_with_one_phase_is_cd_and_more_phases_stop_at_their_edges():
    torch.manual_seed(0)
    student = Teacher().double()
    nn.init.normal_(student.residual.net[-1].weight, std=0.1)
    f = partial(cm.consistency, student, SCHEDULE)
    assert cd(f, f, N=20, k=2).item() == cd(f, f, N=20, k=2, phases=1).item()
    assert cd(f, f, N=20, k=2, solver="dpm_solver").item() == cd(f, f, N=20, k=2, solver="dpm_solver", phases=1).item()
    seen = []
    spy = lambda x, t, edge: seen.append((t.clone(), edge.clone())) or f(x, t, edge)  # noqa: E731
    cd(spy, spy, N=20, k=3, phases=4)
    (t_lo, edge_lo), (t_hi, edge_hi) = seen  # the target first, without gradients
    assert torch.equal(edge_hi, edge_lo) and bool((t_lo >= edge_hi).all()) and bool((t_hi > edge_hi).all())
    assert bool((t_lo == edge_hi).any())  # a teacher step that would cross an edge stops on it: target = x there


def test_ct_loss_of_the_exact_ode_map_is_zero_only_in_the_limit():
    """CT's target uses the same z, not a teacher: even the exact map has a loss, which shrinks as N grows."""
    perfect = lambda x, t, edge: ode_map(x, t)  # noqa: E731
    x0 = DATA.sample(128, generator=torch.Generator().manual_seed(0))
    values = [losses.ct_loss(perfect, perfect, SCHEDULE, x0, N=N, loss="l2", lognormal=False, weighting=False,
                          generator=torch.Generator().manual_seed(1)).item() for N in (5, 50)]  # fmt: skip
    assert values[1] < 0.5 * values[0]


def test_weighting_divides_by_the_gap_in_ve_noise_level():
    """One interval (N = 1: from T-1 onto clean data): iCT's lambda is 1 / s_{T-1} for every sample, CD and CT."""
    s_top = ((1 - SCHEDULE.alphas_cumprod[-1]) / SCHEDULE.alphas_cumprod[-1]).sqrt().item()
    f = partial(cm.consistency, Teacher().double(), SCHEDULE)
    x0 = DATA.sample(64, generator=torch.Generator().manual_seed(0))
    for grid in cm.GRIDS:
        plain, weighted = (cd(f, f, N=1, grid=grid, weighting=w).item() for w in (False, True))
        assert weighted == pytest.approx(plain / s_top, rel=1e-12) and plain > 0
        ct = partial(losses.ct_loss, f, f, SCHEDULE, x0, N=1, grid=grid, loss="l2")
        plain, weighted = (ct(weighting=w, generator=torch.Generator().manual_seed(1)).item() for w in (False, True))
        assert weighted == pytest.approx(plain / s_top, rel=1e-12) and plain > 0


def test_distances():
    a, b = torch.zeros(3, 4), torch.ones(3, 4)
    assert torch.equal(losses.distance("l2", a, b), torch.ones(3))
    c = 0.00054 * 2
    assert torch.allclose(losses.distance("pseudo_huber", a, b), torch.full((3,), math.sqrt(4 + c**2) - c))
    assert torch.equal(losses.distance(lambda x, y: (x - y).abs().sum(1), a, b), torch.full((3,), 4.0))  # e.g. LPIPS
    with pytest.raises(ValueError, match="unknown consistency loss"):
        losses.distance("l1", a, b)


# ---------------------------------------------------------------- target EMA and curriculum


def test_target_ema_follows_its_formula():
    torch.manual_seed(0)
    student, target = MLP(), MLP()
    before = [p.clone() for p in target.parameters()]
    for mu in (0.0, 0.95):
        ema_update(target, student, mu)
        for p_t, p_s, old in zip(target.parameters(), student.parameters(), before, strict=True):
            assert torch.allclose(p_t, mu * old + (1 - mu) * p_s)
        before = [p.clone() for p in target.parameters()]


def test_ct_curriculum_follows_its_formula():
    K = 400_000
    K_prime = math.floor(K / (math.log2(1280 // 10) + 1))  # 50000
    assert K_prime == 50_000
    for k in [0, 1, K_prime - 1, K_prime, 2 * K_prime, 7 * K_prime - 1, 7 * K_prime, K - 1, K, 10 * K]:
        assert losses.ct_steps(k, K) == min(10 * 2 ** (k // K_prime), 1280)
    # K = 80, s1 / s0 = 10: K' = floor(80 / (log2 10 + 1)) = 18
    assert [losses.ct_steps(k, 80, 10, 100) for k in (0, 17, 18, 36, 54, 72, 79)] == [10, 10, 20, 40, 80, 100, 100]
    with pytest.raises(ValueError, match="curriculum"):
        losses.ct_steps(0, 0)


def test_lognormal_weights_put_mass_where_the_paper_does():
    p = losses.lognormal_weights(cm.grid(T, T), SCHEDULE)
    assert torch.allclose(p.sum(), torch.tensor(1.0, dtype=p.dtype)) and bool((p >= 0).all())
    s = ((1 - SCHEDULE.alphas_cumprod) / SCHEDULE.alphas_cumprod).sqrt()  # s_n for n = 1..T
    erf = lambda v: torch.erf((v.log() + 1.1) / (math.sqrt(2) * 2.0))  # noqa: E731
    assert torch.allclose(p[0], (erf(s[0]) + 1) / (erf(s[-1]) + 1))  # interval [clean, t = 0]


# ---------------------------------------------------------------- the sampler


def test_one_step_sampling_of_the_exact_map_is_the_ode_endpoint():
    """A ConsistencyModel over the exact ODE map: one step gives the ODE endpoint from x_T, more steps stay on data."""

    class Exact(nn.Module):  # an eps-net whose consistency function is the exact ODE map (c_skip ~ 0 away from -1)
        def forward(self, x, t):
            c_skip, c_out = (c[:, None] for c in cm.boundary(t))
            x0 = (ode_map(x, t) - c_skip * x) / c_out
            abar = SCHEDULE.alpha_bar(t)[:, None]
            return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    model = cm.ConsistencyModel(Exact(), SCHEDULE)
    x_T = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    one = cm.consistency_sampling(model, x_T, SCHEDULE, torch.tensor([T - 1]), clip=False)
    assert torch.allclose(one, ode_map(x_T, torch.full((200,), T - 1)), atol=1e-9)
    two = cm.consistency_sampling(model, x_T, SCHEDULE, torch.zeros(2), generator=torch.Generator().manual_seed(1),
                                  clip=False)  # fmt: skip
    assert DATA.frechet(two) < 0.1 and not torch.allclose(two, one)


def test_sampler_follows_the_contract_and_refuses_a_start_below_t_minus_1():
    model = cm.ConsistencyModel(Teacher().double(), SCHEDULE)
    calls = []
    spy = lambda x, t: calls.append(t[0].item()) or model(x, t)  # noqa: E731
    x = torch.randn(8, 2, dtype=torch.float64)
    cm.consistency_sampling(spy, x, SCHEDULE, timesteps.leading(4, T), clip=False)
    assert calls == timesteps.trailing(4, T).tolist()  # the default spacing: trailing, whatever was passed
    with pytest.raises(ValueError, match="starts at t = T-1"):
        cm.consistency_sampling(model, x, SCHEDULE, timesteps.leading(2, T), spacing=None)
    calls.clear()
    cm.consistency_sampling(spy, x, SCHEDULE, torch.zeros(3), times=[99, 40, 7], clip=False)
    assert calls == [99, 40, 7]  # given times (a search's) over the spacing
    with pytest.raises(ValueError, match="visits 1 times but steps=2"):
        cm.consistency_sampling(model, x, SCHEDULE, torch.zeros(2), times=[99])
    with pytest.raises(ValueError, match="sampler.spacing='sideways'"):
        cm.consistency_sampling(model, x, SCHEDULE, timesteps.leading(2, T), spacing="sideways")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = cm.consistency_sampling(model, x, SCHEDULE, torch.zeros(4), generator=g1, clip=False)
    assert torch.equal(a, cm.consistency_sampling(model, x, SCHEDULE, torch.zeros(4), generator=g2, clip=False))
    # deterministic PCM sampling at the phase edges: each step lands on the edge the model jumps to
    pcm = cm.ConsistencyModel(Teacher().double(), SCHEDULE, phases=4)
    y, edges = x, [74, 49, 24, -1]
    for t, e in zip([99, 74, 49, 24], edges, strict=True):
        assert cm.edge_below(torch.tensor([t]), pcm.edges).item() == e
        y = pcm.consistency(y, torch.full((8,), t))
    out = cm.consistency_sampling(pcm, x, SCHEDULE, torch.zeros(4), noise=False, clip=False)
    assert torch.allclose(out, y, atol=1e-9)


def test_bad_arguments_are_refused():
    f = partial(cm.consistency, DATA.model(SCHEDULE), SCHEDULE)
    with pytest.raises(ValueError, match="skipping step"):
        cd(f, f, N=10, k=11)
    with pytest.raises(ValueError, match="teacher solver"):
        cd(f, f, solver="heun")
    with pytest.raises(ValueError, match="N <= T"):
        cm.grid(0, T)
    with pytest.raises(ValueError, match="phases"):
        cm.phase_edges(T + 1, T)
    assert cosine(T).T == T


# ---------------------------------------------------------------- benchmarks/consistency_mixture.py


def test_the_benchmarks_time_search_leaves_a_time_below_each_choice(monkeypatch):
    from benchmarks import consistency_mixture as bench

    class Lowest:  # every candidate's "samples" are its own time; the lowest scores best
        frechet = staticmethod(float)

    monkeypatch.setattr(bench, "sample", lambda model, x_T, sched, times, seed: torch.tensor(times[-1]))
    sched, grid = linear(1000), cm.karras(18, linear(1000))[1:-1].tolist()
    for steps in (1, 2, 3, 4):  # greedy on the lowest, the old search took grid[0] at once and had nothing below
        assert bench.search_times(None, Lowest(), sched, steps, None, 0) == [999, *grid[: steps - 1][::-1]]


def test_the_benchmarks_json_names_its_mixture_seed_and_refuses_zero_steps(tmp_path, capsys):
    from benchmarks import consistency_mixture as bench
    from benchmarks.consistency_students import read_students
    from benchmarks.mixture_testbed import image_mixture

    cell = {"fd": 1.0, "rms": 0.5, "other": 0.25}
    doc = bench.as_json({"CD": {1: (1, cell)}}, ((0.05, 0.01), None), 100, seed=1)
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert read_students(tmp_path / "c.json", linear(1000), image_mixture(seed=1), seed=1)[0][0]["other_mode"] == 0.25
    assert read_students(tmp_path / "c.json", linear(1000), image_mixture(), seed=0)[0] == []  # another mixture
    with pytest.raises(SystemExit):
        bench.main(["--iterations", "0"])
    assert "--iterations 0: a student needs at least 1 Adam step" in capsys.readouterr().err


# ---------------------------------------------------------------- train.py and sample.py


def tiny(name: str, *overrides: str) -> list[str]:
    """TINY_RUN with another experiment preset: 16x16 synthetic images, the tiny UNet, a 1- and 2-step grid."""
    from .conftest import TINY_RUN

    base = [o for o in TINY_RUN if not o.startswith("experiment=")]
    return [*base, f"experiment={name}", "data=synthetic", "model=unet_tiny", "data.image_size=16",
            "callbacks.samples_2.n=4", "callbacks.samples.steps=1", *overrides]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step DDPM teacher and a 4-step CD student of it: their folders."""
    from train import train

    from .conftest import TINY_RUN, compose_config

    root = tmp_path_factory.mktemp("consistency")
    train(compose_config("train", [*TINY_RUN, "data.image_size=16", "trainer.max_steps=3"], root / "teacher"))
    teacher = root / "teacher" / "checkpoints" / "last.ckpt"
    train(compose_config("train", tiny("cd", f"teacher={teacher}", "trainer.max_steps=4"), root / "cd"))
    return root


def test_a_cd_run_writes_a_checkpoint_that_samples_through_sample_py(runs):
    from diffusion.io import checkpoints
    from sample import sample

    from .conftest import compose_config

    ckpt = checkpoints.load(runs / "cd" / "checkpoints" / "last.ckpt")
    teacher = checkpoints.load(runs / "teacher" / "checkpoints" / "last.ckpt")
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"model", "ema", "target"}  # never the teacher's weights
    assert ckpt["config"]["teacher"] == str(runs / "teacher" / "checkpoints" / "last.ckpt")
    assert ckpt["config"]["model"] == teacher["config"]["model"]  # the student is built as its teacher
    assert ckpt["config"]["consistency"]["method"] == "cd" and ckpt["global_step"] == 4
    assert (runs / "cd" / "samples" / "step_0000003.png").is_file()
    assert (runs / "cd" / "samples_2step" / "step_0000003.png").is_file()
    assert "train/consistency_loss" in next((runs / "cd").glob("csv/version_*/metrics.csv")).read_text()
    model, _ = checkpoints.load_model(ckpt)
    assert isinstance(model, cm.ConsistencyModel) and model.phases == 1
    for steps in (1, 2, 4):
        overrides = [f"ckpt={runs / 'cd' / 'checkpoints' / 'last.ckpt'}", "logger=none", "n_samples=3", "batch_size=2",
                     "sampler=consistency", f"steps={steps}"]  # fmt: skip
        images = sample(compose_config("sample", overrides, runs / f"sample_{steps}"))
        assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    overrides = [f"ckpt={runs / 'cd' / 'checkpoints' / 'last.ckpt'}", "logger=none", "n_samples=2", "batch_size=2",
                 "sampler=consistency", "steps=2", "sampler.times=[999,342]"]  # fmt: skip
    assert sample(compose_config("sample", overrides, runs / "sample_times")).shape == (2, 16, 16, 3)
    overrides = [*overrides[:-1], "sampler.spacing=null"]  # sample.py's timesteps: the sampler's own, trailing
    assert sample(compose_config("sample", overrides, runs / "sample_null")).shape == (2, 16, 16, 3)


def test_a_cd_run_resumes(runs):
    from diffusion.io import checkpoints
    from train import train

    from .conftest import compose_config

    last = runs / "cd" / "checkpoints" / "last.ckpt"
    overrides = ["trainer=cpu", "logger=csv", "data.num_workers=0", "trainer.enable_progress_bar=false",
                 "~callbacks.progress", "trainer.max_steps=6", f"resume={last}"]  # fmt: skip
    module = train(compose_config("train", overrides, runs / "resumed"))  # no experiment=: the checkpoint's config
    assert module.global_step == 6 and module.method == "cd" and module.target is not None and module.grid == "karras"
    assert (runs / "resumed" / "samples_2step" / "step_0000006.png").is_file()  # experiment=cd's callback came back
    resumed = checkpoints.load(runs / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["config"]["run_id"] == checkpoints.load(last)["config"]["run_id"]
    old = checkpoints.load(last)  # a run written before consistency.grid existed: it trained on the uniform grid
    del old["config"]["consistency"]["grid"]
    (runs / "old").mkdir()
    torch.save(old, runs / "old" / "last.ckpt")
    overrides = [*overrides[:-2], "trainer.max_steps=5", f"resume={runs / 'old' / 'last.ckpt'}"]
    assert train(compose_config("train", overrides, runs / "resumed_old")).grid == "uniform"


def test_a_distillation_run_is_bound_to_its_teachers_weights(runs, tmp_path):
    """The student's checkpoint records its teacher's digest. On resume the teacher at the run's path must still be
    that one (a teacher run that kept training is refused, in one line); a moved teacher may be given again with
    teacher=NEW when its weights are the same, and another teacher may not."""
    import shutil

    from diffusion.errors import UsageError
    from diffusion.io import checkpoints
    from diffusion.weights import weights_digest
    from train import train

    from .conftest import compose_config

    teacher = runs / "teacher" / "checkpoints" / "last.ckpt"
    student = checkpoints.load(runs / "cd" / "checkpoints" / "last.ckpt")
    net, _ = checkpoints.load_model(checkpoints.load(teacher))
    assert student["config"]["teacher_digest"] == weights_digest(net)
    here = tmp_path / "teacher.ckpt"  # the run's teacher path, in a folder of this test's
    shutil.copy(teacher, here)
    student["config"]["teacher"] = str(here)
    (tmp_path / "run").mkdir()
    torch.save(student, tmp_path / "run" / "last.ckpt")
    resume = ["trainer=cpu", "logger=csv", "data.num_workers=0", "trainer.max_steps=5",
              f"resume={tmp_path / 'run' / 'last.ckpt'}"]  # fmt: skip
    assert train(compose_config("train", resume, tmp_path / "a")).global_step == 5

    retrained = checkpoints.load(teacher)  # the teacher's run went on: the same path, other weights
    retrained["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in retrained["state_dict"].items()}
    torch.save(retrained, here)
    with pytest.raises(UsageError, match=r"teacher=.*teacher.ckpt is not this run's teacher: its weights' digest") as e:
        train(compose_config("train", resume, tmp_path / "b"))
    assert "\n" not in str(e.value)

    moved = tmp_path / "moved.ckpt"  # the original weights, elsewhere
    shutil.copy(teacher, moved)
    module = train(compose_config("train", [*resume, f"teacher={moved}"], tmp_path / "c"))
    assert module.global_step == 5
    assert checkpoints.load(tmp_path / "c" / "checkpoints" / "last.ckpt")["config"]["teacher"] == str(moved)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["model.ch=64"], "model.ch=64 (the teacher's: 16)"),
        (["schedule=cosine"], "schedule="),
        (["data.image_size=32"], "data.image_size=32 (the teacher takes 16x16 images)"),
        (["data.channels=1"], "data.channels=1 (the teacher takes 3)"),
    ],
)
def test_what_contradicts_the_teacher_is_refused(runs, tmp_path, overrides, named):
    """The student is the teacher's network on the teacher's data: explicit model and schedule overrides that differ,
    and data of another size or channel count, stop the run before it builds anything (they used to be dropped, or
    a raw RuntimeError at the first step)."""
    from diffusion.errors import UsageError
    from train import train

    from .conftest import compose_config

    teacher = runs / "teacher" / "checkpoints" / "last.ckpt"
    with pytest.raises(UsageError, match="the student of teacher=") as error:
        train(compose_config("train", tiny("cd", f"teacher={teacher}", *overrides), tmp_path))
    assert named in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_ct_and_pcm_runs(runs):
    from diffusion.io import checkpoints
    from train import train

    from .conftest import compose_config

    ct = train(compose_config("train", tiny("ct", "trainer.max_steps=2"), runs / "ct"))
    assert ct.target is None and ct.curriculum() == losses.ct_steps(2, 2, 10, 1280) == 40  # K' = 1: doubling each step
    teacher = runs / "teacher" / "checkpoints" / "last.ckpt"
    train(compose_config("train", tiny("pcm", f"teacher={teacher}", "consistency.phases=2", "trainer.max_steps=2"),
                         runs / "pcm"))  # fmt: skip
    model, _ = checkpoints.load_model(checkpoints.load(runs / "pcm" / "checkpoints" / "last.ckpt"))
    assert model.phases == 2 and model.edges.tolist() == [-1, 499]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=cd"], "needs a teacher"),
        (["experiment=ct", "teacher=x.ckpt"], "consistency training has no teacher"),
        (["experiment=ct", "consistency.loss=lpips"], "ImageNet VGG16 weights.*DIFFUSION_LPIPS_VGG"),
        (["experiment=ct", "consistency.method=gan"], "use cd"),
        (["experiment=ct", "consistency.mu=1.0"], "EMA rate"),
        (["experiment=ct", "consistency.phases=2"], "PCM = method cd"),
        (["experiment=ct", "consistency.grid=edm"], "choose karras"),
        (["experiment=cd", "teacher=/nonexistent.ckpt"], "no checkpoint at"),
    ],
)
def test_bad_training_options_are_refused(tmp_path, monkeypatch, overrides, message):
    from diffusion.errors import UsageError
    from train import train

    from .conftest import compose_config

    monkeypatch.setenv("DIFFUSION_LPIPS_VGG", str(tmp_path / "no_vgg16.pth"))  # not on this machine, whatever its cache
    with pytest.raises(UsageError, match=message):
        train(compose_config("train", tiny(overrides[0].split("=")[1], *overrides[1:]), tmp_path))


def test_a_consistency_model_is_not_a_teacher(runs, tmp_path):
    from diffusion.errors import UsageError
    from train import train

    from .conftest import compose_config

    with pytest.raises(UsageError, match="is a consistency model"):
        train(compose_config("train", tiny("cd", f"teacher={runs / 'cd' / 'checkpoints' / 'last.ckpt'}"), tmp_path))
