"""The loss, the EMA update, and checkpoint files (atomic writes, safe loading)."""

import os

import pytest
import torch
from torch import nn

from diffusion import schedule
from diffusion.io import checkpoints
from diffusion.training.losses import eps_loss
from diffusion.training.module import ema_update


def test_eps_loss_is_zero_for_the_exact_predictor_and_one_for_zero():
    """Data x0 = 0: then x_t = sqrt(1 - abar) eps, so x_t / sqrt(1 - abar) is the exact noise."""
    sched = schedule.linear(1000)

    def exact(x, t):
        return x / (1 - sched.alphas_cumprod[t].float()).sqrt().view(-1, 1, 1, 1)

    x0 = torch.zeros(256, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert eps_loss(exact, sched, x0, generator=g).item() < 1e-10
    zero_loss = eps_loss(lambda x, t: torch.zeros_like(x), sched, x0, generator=g).item()
    assert zero_loss == pytest.approx(1.0, abs=0.05)  # E[eps^2] = 1


def test_eps_loss_draws_from_the_generator():
    sched = schedule.linear(100)
    net = nn.Conv2d(3, 3, 1)
    model = lambda x, t: net(x)  # noqa: E731
    x0 = torch.randn(8, 3, 4, 4)
    a = eps_loss(model, sched, x0, generator=torch.Generator().manual_seed(3))
    b = eps_loss(model, sched, x0, generator=torch.Generator().manual_seed(3))
    c = eps_loss(model, sched, x0, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()


def test_ema_update_is_the_exponential_average():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
    for _ in range(3):
        ema_update(ema, model, decay=0.9)
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 1 - 0.9**3))


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    io = checkpoints.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "config": {}}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint at"):
        checkpoints.load(tmp_path / "nope.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x80\x04 not really a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="cannot read"):
        checkpoints.load(tmp_path / "corrupt.ckpt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint of this project"):
        checkpoints.load(tmp_path / "foreign.ckpt")


def test_a_checkpoint_that_would_inflate_past_its_size_is_refused_unread(tmp_path):
    """torch.save writes stored (uncompressed) zip members; a deflated member inflates under torch.load (2.6 MB held
    1 GiB). Refused before torch.load reads a byte of it, as are members that overlap (claiming more than the file)."""
    import zipfile

    torch.save({"state_dict": {"w": torch.zeros(4)}, "config": {}}, tmp_path / "real.ckpt")
    with zipfile.ZipFile(tmp_path / "real.ckpt") as real, zipfile.ZipFile(tmp_path / "packed.ckpt", "w") as packed:
        for info in real.infolist():
            packed.writestr(info.filename, real.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(checkpoints.CheckpointError, match="holds a compressed member .* which torch.save never"):
        checkpoints.load(tmp_path / "packed.ckpt")
    assert checkpoints.load(tmp_path / "real.ckpt")["state_dict"]["w"].shape == (4,)


class Evil:
    def __reduce__(self):
        return (print, ("this ran from a checkpoint",))


def test_load_never_runs_code_from_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}, "config": {}, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match="cannot read"):
        checkpoints.load(tmp_path / "evil.ckpt")


class FakeTrainer:
    """What Checkpoints reads of a Trainer, and a record of the saves it asks for."""

    def __init__(self, world_size: int, step: int = 7):
        self.world_size, self.global_step, self.is_global_zero = world_size, step, True
        self.loggers, self.saved = [], []
        self.strategy = type("Strategy", (), {"reduce_boolean_decision": staticmethod(lambda ok, all=True: ok)})()

    def save_checkpoint(self, path, weights_only=None):
        self.saved.append(path)


@pytest.mark.parametrize("world_size, saves", [(1, True), (2, False), (8, False)])
def test_ctrl_c_saves_only_where_a_save_cannot_hang(tmp_path, world_size, saves):
    """With several processes a save is a collective: one rank interrupted while the others sit in an all-reduce
    would wait forever, so only a single process saves on Ctrl-C."""
    callback, trainer = checkpoints.Checkpoints(tmp_path), FakeTrainer(world_size)
    callback.on_exception(trainer, nn.Linear(2, 2), KeyboardInterrupt())
    assert trainer.saved == ([tmp_path / "last.ckpt"] if saves else [])
    callback.on_exception(trainer, nn.Linear(2, 2), ValueError("a bug"))  # a bug's state is not trusted
    assert len(trainer.saved) == int(saves)


def test_sigterm_saves_the_steps_since_the_last_checkpoint(tmp_path):
    """kill / a cluster's preemption send SIGTERM: Lightning stops between steps and the run keeps its last steps."""
    import itertools
    import signal

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader, IterableDataset

    class Endless(IterableDataset):
        def __iter__(self):
            return (torch.ones(2) for _ in itertools.count())

    class Killed(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, mid-step
            return self.w(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = checkpoints.Checkpoints(tmp_path, last_every_n_steps=4, keep_every_n_steps=0)
    trainer = L.Trainer(max_steps=100, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(SIGTERMException):
        trainer.fit(Killed(), DataLoader(Endless(), batch_size=4))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6  # not 4: the periodic save


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from .test_resume import dead_pid

    stale, live = tmp_path / f".last.ckpt.{dead_pid()}.tmp", tmp_path / f".step_0000010.ckpt.{os.getpid()}.tmp"
    keep = tmp_path / "last.ckpt"
    for path in (stale, live, keep):
        path.write_bytes(b"x")
    assert checkpoints.remove_stale_temporaries(tmp_path, tmp_path / "missing") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, keep.name])


def test_the_learning_rate_warms_up_then_stays_or_decays_to_zero_at_max_steps():
    from diffusion.training.module import lr_factor

    assert [lr_factor(s, warmup=4, total=None) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    cosine = [lr_factor(s, warmup=4, total=14) for s in range(20)]
    assert cosine[:3] == [0.25, 0.5, 0.75] and cosine[3] == 1.0  # the warm-up, then the top of the cosine
    assert cosine[8] == pytest.approx(0.5) and cosine[13] == pytest.approx(0.0) and cosine[19] == 0.0  # half way, end
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:], strict=False))


def test_a_cosine_decay_needs_max_steps_beyond_the_warm_up(tmp_path):
    from diffusion.errors import UsageError
    from diffusion.schedule import linear
    from diffusion.training.module import DiffusionModule
    from diffusion.unet import UNet

    net = UNet(in_channels=3, out_channels=3, resolution=8, ch=8, ch_mult=[1], num_res_blocks=1, attn_resolutions=[],
               norm_groups=4)  # fmt: skip
    with pytest.raises(UsageError, match="lr_decay='linear'"):
        DiffusionModule(net, linear(T=10), torch.optim.Adam, lr_decay="linear")
    module = DiffusionModule(net, linear(T=10), torch.optim.Adam, warmup_steps=10, lr_decay="cosine")
    with pytest.raises(UsageError, match="trainer.max_steps"):
        module.configure_optimizers()  # no trainer: no max_steps to decay to
