"""Class-conditional sampling and guidance (diffusion.wrappers.guidance), against closed forms.

On a Gaussian mixture with one class per mode the exact conditional eps (one Gaussian's) and the exact unconditional
eps (the mixture's) are known (GaussianMixture.eps with labels). With them:
- at scale 0 every sampler draws from the requested mode: all samples nearest its mean, the Frechet distance to that
  mode's Gaussian at the noise floor of as many exact samples;
- the guided output is Ho & Salimans's (1 + w) out_c - w out_u, from one batched forward of 2B images, equal to two
  separate calls; guiding a v-network's raw output gives the eps-network's samples (the combination is affine);
- DeepCache at interval 1 and Skip-Tuning at rho = 1 under guidance are plain guidance bit for bit, and a cached
  guided forward is the two halves each cached on its own; the interval guides only inside it, at B rows outside;
- CFG rescale gives each image the conditional output's std at phi = 1; autoguidance with the model as its own guide
  is the model.
Then sample.py end to end on a tiny conditional checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import sampling, timesteps
from diffusion import schedule as S
from diffusion.errors import UsageError
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import DeepCache
from diffusion.wrappers.guidance import Guided, sigma_of
from diffusion.wrappers.prediction import Prediction
from diffusion.wrappers.skiptuning import SkipTuning
from sample import sample
from train import train

from .conftest import TINY_RUN, compose_config
from .test_prediction import DATA, exact_gamma, gen  # the same 4x4x2 mixture of three modes

pytestmark = pytest.mark.usefixtures("one_thread")

K, N = 3, 600
SCHEDULES = [S.linear(1000), S.cosine(1000)]


SAMPLERS = {  # name: (sampler, steps): 50 steps each, as many NFE as FON's 13 RK4 steps; DDPM needs more
    "ddpm": (sampling.ddpm, 200), "ddim": (sampling.ddim, 50), "pndm": (sampling.pndm, 50),
    "s_pndm": (sampling.s_pndm, 50), "plms": (sampling.plms, 50), "dpm_solver": (sampling.dpm_solver, 50),
    "dpm_solver_3m": (sampling.dpm_solver_3m, 50), "unipc": (sampling.unipc, 50), "fon": (sampling.fon, 13),
    "pf": (sampling.pf, 50), "analytic_ddpm": (sampling.analytic_ddpm, 50),
    "analytic_ddim": (sampling.analytic_ddim, 50),
}  # fmt: skip


def guided_exact(schedule: S.Schedule, y: torch.Tensor | None, **options) -> Guided:
    model = Guided(DATA.conditional(schedule), K, schedule=schedule, **options)
    model.condition(y)
    return model


def run(name: str, model, schedule: S.Schedule, x_T: torch.Tensor) -> torch.Tensor:
    sampler, steps = SAMPLERS[name]
    spacing = timesteps.paper_spacing(sampler)[0]
    if "analytic" in name:  # the unconditional model's Gamma, as sample.py takes it (docs/guidance.md)
        sampler = functools.partial(sampler, gamma=exact_gamma(schedule), clip=False, data_var=1.0)
        spacing = "even"
    return sampler(model, x_T, schedule, timesteps.make(spacing, steps, schedule), generator=gen(2))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_at_scale_0_draws_from_the_requested_mode(name, schedule):
    y = torch.arange(N) % K
    out = run(name, guided_exact(schedule, y), schedule, torch.randn(N, *DATA.shape, generator=gen(0),
                                                                     dtype=torch.float64))  # fmt: skip
    assert torch.equal(DATA.nearest_mode(out), y)
    for k in range(K):  # the noise floor: as many exact samples of mode k
        mode = DATA.component(k)
        floor = mode.frechet(mode.sample(N // K, gen(10 + k)))
        assert mode.frechet(out[y == k]) < 1.35 * floor, (k, mode.frechet(out[y == k]), floor)


class Recording(torch.nn.Module):
    """A conditional network that records the rows and labels of every call."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y=None):
        self.calls.append((len(x), None if y is None else y.clone()))
        return self.net(x, t, y)


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_guidance_is_ho_and_salimans_combination_from_one_batched_forward(w):
    schedule, y = SCHEDULES[0], torch.tensor([0, 2, 1, 2])
    x, t = torch.randn(4, *DATA.shape, generator=gen(1), dtype=torch.float64), torch.full((4,), 400)
    net = Recording(DATA.conditional(schedule))
    model = Guided(net, K, scale=w)
    model.condition(y)
    out = model(x, t)
    assert len(net.calls) == 1 and net.calls[0][0] == 8 and net.calls[0][1].tolist() == [0, 2, 1, 2, 3, 3, 3, 3]
    c, u = DATA.eps(x, t, schedule, y), DATA.eps(x, t, schedule)  # one Gaussian's, the mixture's
    torch.testing.assert_close(out, (1 + w) * c - w * u, rtol=0, atol=1e-12)


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=8, norm_groups=8,
               dropout=0.0, num_classes=4, **kwargs).eval()  # fmt: skip
    for p in net.parameters():  # the zero-initialised branches would make every label give the same output
        p.data.add_(0.05 * torch.randn_like(p))
    return net


@torch.no_grad()
def test_the_batched_forward_equals_two_separate_calls():
    net, y = tiny_unet(), torch.tensor([0, 3, 1])
    x, t = torch.randn(3, 3, 8, 8, generator=gen(0)), torch.full((3,), 700)
    model = Guided(net, 4, scale=1.5)
    model.condition(y)
    c, u = net(x, t, y), net(x, t, torch.full((3,), 4))
    torch.testing.assert_close(model(x, t), c + 1.5 * (c - u), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_deepcache_and_skip_tuning_under_guidance():
    """interval 1 and rho 1: plain guidance bit for bit. interval 3: the batched cached forward is each half cached
    on its own (the conditional half with y, the unconditional half with no label)."""
    net, schedule, y = tiny_unet(), S.linear(1000), torch.tensor([0, 3, 1])
    ts = timesteps.make("leading", 6, schedule)
    x_T = torch.randn(3, 3, 8, 8, generator=gen(0))

    def draw(inner):
        model = Guided(inner, 4, scale=2.0)
        model.condition(y)
        return sampling.ddim(model, x_T.clone(), schedule, ts)

    plain = draw(net)
    assert torch.equal(draw(DeepCache(net, ts, interval=1)), plain)
    assert torch.equal(draw(SkipTuning(net, rho_top=1.0, rho_bottom=1.0)), plain)
    cached = draw(DeepCache(net, ts, interval=3))
    halves = [DeepCache(net, ts, interval=3), DeepCache(net, ts, interval=3)]

    def separately(x, t):
        c, u = halves[0](x, t, y), halves[1](x, t, torch.full((3,), 4))
        return c + 2.0 * (c - u)

    torch.testing.assert_close(cached, sampling.ddim(separately, x_T.clone(), schedule, ts), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cached, plain, atol=1e-4)  # the cache did skip work
    shallow = []  # a shallow step sees its labels: the same cache, other labels, other eps
    for labels in (y, torch.tensor([2, 2, 2])):
        cache = DeepCache(net, ts, interval=3)
        cache(x_T, torch.full((3,), ts[0].item()), y)
        shallow.append(cache(x_T, torch.full((3,), ts[1].item()), labels))
    assert cache.shallow_calls == 1 and not torch.allclose(shallow[0][2], shallow[1][2], atol=1e-5)


def test_the_interval_guides_inside_it_and_calls_b_rows_outside():
    schedule, y = SCHEDULES[0], torch.arange(6) % K
    net = Recording(DATA.conditional(schedule))
    model = Guided(net, K, scale=3.0, interval=(0.5, 2.0), schedule=schedule)
    model.condition(y)
    x = torch.randn(6, *DATA.shape, generator=gen(3), dtype=torch.float64)
    ts = timesteps.make("leading", 50, schedule)
    for t in ts.tolist():
        tb = torch.full((6,), t)
        out, sigma = model(x, tb), sigma_of(schedule, tb)[0].item()
        c, u = DATA.eps(x, tb, schedule, y), DATA.eps(x, tb, schedule)
        wanted = 4 * c - 3 * u if 0.5 < sigma <= 2.0 else c
        torch.testing.assert_close(out, wanted, rtol=0, atol=1e-12)
        assert net.calls[-1][0] == (12 if 0.5 < sigma <= 2.0 else 6)
    inside = sum(rows == 12 for rows, _ in net.calls)
    assert 0 < inside < len(ts)  # both kinds of steps occurred
    with pytest.raises(ValueError, match="must be \\[sigma_lo, sigma_hi\\]"):
        Guided(net, K, scale=1.0, interval=(2.0, 0.5), schedule=schedule)


def test_cfg_rescale_gives_the_conditional_std_at_phi_1():
    schedule, y = SCHEDULES[1], torch.tensor([0, 1, 2, 0])
    x, t = torch.randn(4, *DATA.shape, generator=gen(4), dtype=torch.float64), torch.full((4,), 900)
    outs = {phi: guided_exact(schedule, y, scale=4.0, rescale=phi)(x, t) for phi in (0.0, 0.5, 1.0)}
    c, u = DATA.eps(x, t, schedule, y), DATA.eps(x, t, schedule)
    plain = 5 * c - 4 * u
    torch.testing.assert_close(outs[0.0], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(outs[1.0].flatten(1).std(1), c.flatten(1).std(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(outs[0.5], (outs[0.0] + outs[1.0]) / 2, rtol=0, atol=1e-12)
    assert not torch.allclose(outs[1.0], plain)


def test_autoguidance_extrapolates_away_from_the_weaker_model():
    schedule, y = SCHEDULES[0], torch.tensor([0, 1, 2])
    x, t = torch.randn(3, *DATA.shape, generator=gen(5), dtype=torch.float64), torch.full((3,), 600)
    main = DATA.conditional(schedule)
    same = Guided(main, K, scale=2.0, guide=main)
    same.condition(y)
    assert torch.equal(same(x, t), main(x, t, y))  # a guide equal to the model changes nothing
    weaker = type(DATA)(DATA.means, DATA.weights, 0.35)  # a blurrier model of the same data
    model = Guided(main, K, scale=2.0, guide=weaker.conditional(schedule))
    model.condition(y)
    c, g = DATA.eps(x, t, schedule, y), weaker.eps(x, t, schedule, y)
    torch.testing.assert_close(model(x, t), 3 * c - 2 * g, rtol=0, atol=1e-12)
    unconditional = Guided(DATA.conditional(schedule), 0, scale=2.0, guide=weaker.conditional(schedule))
    torch.testing.assert_close(unconditional(x, t), 3 * DATA.eps(x, t, schedule) - 2 * weaker.eps(x, t, schedule),
                               rtol=0, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "pndm", "unipc"])
def test_guiding_a_v_network_samples_as_guiding_the_eps_network(name):
    """The guided raw v output, converted outside the guidance, gives the guided eps-network's samples."""
    schedule, y = SCHEDULES[1], torch.arange(60) % K

    def v_net(x, t, y=None):
        abar = schedule.alpha_bar(t).view(-1, 1, 1, 1)
        return S.target("v", DATA.x0(x, t, schedule, y), DATA.eps(x, t, schedule, y), abar)

    x_T = torch.randn(60, *DATA.shape, generator=gen(6), dtype=torch.float64)
    eps_model = guided_exact(schedule, y, scale=1.5)
    v_model = Guided(v_net, K, scale=1.5)
    v_model.condition(y)
    torch.testing.assert_close(run(name, Prediction(v_model, schedule, "v"), schedule, x_T.clone()),
                               run(name, eps_model, schedule, x_T.clone()), rtol=0, atol=1e-9)  # fmt: skip


# ---------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """3-step runs: a conditional one (2 classes: the shapes), a smaller conditional guide, an unconditional one."""
    root, out = tmp_path_factory.mktemp("guidance"), {}
    runs = {
        "cond": ["conditional=true"],
        "guide": ["conditional=true", "model.ch=8", "model.norm_groups=4"],
        "plain": [],
    }
    for name, extra in runs.items():
        train(compose_config("train", [*TINY_RUN, "trainer.max_steps=3", *extra], root / name))
        out[name] = root / name / "checkpoints" / "last.ckpt"
    return out


def draw(ckpt: Path, folder: Path, *extra: str) -> tuple[np.ndarray, np.lib.npyio.NpzFile]:
    images = sample(compose_config("sample", [f"ckpt={ckpt}", "logger=none", "n_samples=6", "steps=3", *extra],
                                   folder))  # fmt: skip
    return images, np.load(folder / "samples.npz")


def test_labels_depend_on_the_image_alone_and_are_stored_as_arr_1(ckpts, tmp_path):
    images, npz = draw(ckpts["cond"], tmp_path / "a", "guidance=1.0")
    assert npz["arr_1"].tolist() == [0, 1, 0, 1, 0, 1] and (npz["arr_0"] == images).all()
    batched, _ = draw(ckpts["cond"], tmp_path / "b", "guidance=1.0", "batch_size=4")
    assert (batched == images).all()
    one, npz = draw(ckpts["cond"], tmp_path / "c", "guidance=1.0", "labels=[1]")
    assert npz["arr_1"].tolist() == [1] * 6
    assert (one[1] == images[1]).all() and (one[3] == images[3]).all()  # the same (seed, i) and label: same image


def test_the_grid_has_a_row_per_class(ckpts, tmp_path):
    draw(ckpts["cond"], tmp_path, "n_samples=8")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] == 2 * (32 + 2) + 2 and grid.shape[1] == 4 * (32 + 2) + 2  # 2 classes x 4 images


def test_wandb_gets_a_grid_per_class(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sample(compose_config("sample", [f"ckpt={ckpts['cond']}", "logger=wandb", "n_samples=6", "steps=3",
                                     "guidance=1.5", "guidance_rescale=0.7"], tmp_path))  # fmt: skip
    grids = sorted(tmp_path.glob("wandb/offline-run-*/files/media/images/samples_*.png"))
    assert len(grids) == 2  # disc, square
    assert "ddim + classifier-free guidance w=1.5 (rescale 0.7), 3 leading steps" in capsys.readouterr().out


def test_autoguidance_and_the_options_compose_with_deepcache_and_every_sampler(ckpts, tmp_path):
    for i, extra in enumerate([["sampler=dpm_solver", f"guide={ckpts['guide']}", "guidance=1.0"],
                               ["cache=deepcache", "guidance=2.0", "guidance_interval=[0.3,3]"],
                               ["sampler=pndm", "guidance=1.0", "guidance_rescale=0.7"],
                               ["sampler=analytic_ddim", "guidance=1.0", "gamma_M=4"]]):  # fmt: skip
        images, npz = draw(ckpts["cond"], tmp_path / str(i), *extra)
        assert images.shape == (6, 32, 32, 3) and npz["arr_1"].tolist() == [0, 1] * 3


@pytest.mark.parametrize(
    "which, extra, message",
    [
        ("plain", ["labels=[1]"], r"labels=\[1\]: .* is unconditional .* so it takes no labels"),
        ("plain", ["guidance=2"], "guidance=2 without guide=: classifier-free guidance needs a class-conditional"),
        ("cond", ["labels=[0,2]"], r"labels=\[0, 2\]: each label must be a class 0..1 of this model"),
        ("cond", ["guidance=-1"], "guidance=-1: use a number >= 0"),
        ("cond", ["guidance=1", "guidance_rescale=2"], r"guidance_rescale=2 must lie in \[0, 1\]"),
        ("cond", ["guidance=1", "guidance_interval=[3,1]"], r"must be \[sigma_lo, sigma_hi\]"),
        ("cond", ["guide=PLAIN", "guidance=1"], "is not a model of the same kind: it has classes None"),
    ],
)
def test_bad_guidance_is_refused_in_one_line(ckpts, tmp_path, which, extra, message):
    extra = [e.replace("PLAIN", str(ckpts["plain"])) for e in extra]
    with pytest.raises(UsageError, match=message) as error:
        draw(ckpts[which], tmp_path, *extra)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "samples.npz").exists()


def test_autoguidance_serves_an_unconditional_model(ckpts, tmp_path):
    images, npz = draw(ckpts["plain"], tmp_path, f"guide={ckpts['plain']}", "guidance=1.0")
    plain, _ = draw(ckpts["plain"], tmp_path / "p")
    assert npz.files == ["arr_0"] and (images == plain).all()  # its own guide: the model itself


# ---------------------------------------------------------------- consistency distillation from a conditional teacher


def test_a_conditional_teacher_distils_into_a_guided_student_that_samples_each_class(ckpts, tmp_path):
    """LCM's recipe: the teacher's ODE steps are guided at consistency.guidance; the student takes the labels."""
    from diffusion.io import checkpoints

    cd = [o for o in TINY_RUN if not o.startswith(("experiment=", "model."))] + [
        "experiment=cd", "data=synthetic", "data.image_size=32", f"teacher={ckpts['cond']}", "trainer.max_steps=2",
        "callbacks.samples_2.n=4", "callbacks.samples.steps=1", "consistency.guidance=1.5"]  # fmt: skip
    module = train(compose_config("train", cd, tmp_path / "cd"))
    assert module.num_classes == 2 and module.guidance == 1.5
    x, t, y = torch.randn(3, 3, 32, 32, generator=gen(0)), torch.full((3,), 500), torch.tensor([0, 1, 2])
    raw = module._teacher[0]  # the teacher CD steps along, guided with the batch's labels (2: a dropped one)
    with torch.no_grad():
        c, u = raw(x, t, y), raw(x, t, torch.full((3,), 2))
        torch.testing.assert_close(module.teacher_model(y)(x, t), c + 1.5 * (c - u), rtol=1e-5, atol=1e-6)
    student = tmp_path / "cd" / "checkpoints" / "last.ckpt"
    config = checkpoints.load(student)["config"]
    assert config["conditional"] is True and config["model"]["num_classes"] == 2
    overrides = [f"ckpt={student}", "logger=none", "n_samples=4", "steps=2", "sampler=consistency", "labels=[1]"]
    images = sample(compose_config("sample", overrides, tmp_path / "s"))
    assert images.shape == (4, 32, 32, 3) and np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [1] * 4
    with pytest.raises(UsageError, match="is a consistency model: it was distilled from a teacher guided"):
        sample(compose_config("sample", [*overrides, "guidance=1"], tmp_path / "g"))
    with pytest.raises(UsageError, match="distils a class-conditional teacher, and teacher=.* is unconditional"):
        train(compose_config("train", [*cd[:-1], f"teacher={ckpts['plain']}", "conditional=true"], tmp_path / "u"))


def test_consistency_training_takes_labels(tmp_path):
    ct = [o for o in TINY_RUN if not o.startswith("experiment=")] + [
        "experiment=ct", "data=synthetic", "model=unet_tiny", "data.image_size=32", "conditional=true",
        "trainer.max_steps=2", "callbacks.samples.steps=1"]  # fmt: skip
    module = train(compose_config("train", ct, tmp_path))
    assert module.num_classes == 2 and module.model.class_embed is not None


# ---------------------------------------------------------------- benchmarks/guidance_mixture.py


def test_the_guidance_benchmark_writes_its_table_from_two_checkpoints(tmp_path):
    """On an untrained conditional UNet: every row and scale is a cell; the exact rows draw the requested mode."""
    from benchmarks.guidance_mixture import main

    model = dict(in_channels=3, out_channels=3, resolution=8, ch=8, ch_mult=[1, 1], num_res_blocks=1,
                 attn_resolutions=[], dropout=0.0, norm_groups=4, num_classes=3)  # fmt: skip
    data = {"_target_": "diffusion.synthetic.Mixture", "root": "", "num_images": 16, "num_val": 4, "num_modes": 3,
            "image_size": 8, "channels": 3, "batch_size": 4, "num_workers": 0, "seed": 0,
            "conditional": True}  # fmt: skip
    for name in ("last", "early"):
        torch.manual_seed(len(name))
        state = {f"ema.{k}": v for k, v in UNet(**model).state_dict().items()}
        config = {"model": {"_target_": "diffusion.unet.UNet", **model}, "data": data,
                  "schedule": {"_target_": "diffusion.schedule.linear", "T": 1000}}  # fmt: skip
        torch.save({"state_dict": state, "config": config, "global_step": 7}, tmp_path / f"{name}.ckpt")
    out = tmp_path / "g.md"
    main(["--checkpoint", str(tmp_path / "last.ckpt"), "--guide", str(tmp_path / "early.ckpt"), "--per-mode", "8",
          "--scales", "0", "2", "--nfe", "4", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| exact") or line.startswith("| trained")]
    assert len(rows) == 10 and all(line.count("%") == 2 for line in rows)
    assert rows[0].startswith("| exact, CFG, DPM-Solver++(2M) | 100.0% / ")  # the exact conditional model
    assert "x) | " in text.split("Cost of a guided step")[1] and out.with_suffix(".png").is_file()
