"""The training bar counts optimizer steps towards max_steps, also after a resume (the data stream is endless)."""

import itertools

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from diffusion.training.callbacks import StepProgressBar


class Endless(IterableDataset):
    def __iter__(self):
        return (torch.ones(2) for _ in itertools.count())


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, max_steps, ckpt_path=None, accumulate=1):
    bar = StepProgressBar(refresh_rate=3)
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
        accumulate_grad_batches=accumulate, default_root_dir=tmp_path, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(Endless(), batch_size=4), ckpt_path=ckpt_path)
    return trainer, bar.train_progress_bar


def test_the_bar_counts_steps_to_max_steps_and_starts_a_resumed_run_at_its_step(tmp_path):
    trainer, bar = _fit(tmp_path, 10)
    assert (bar.n, bar.total, bar.initial) == (10, 10, 0)
    assert "10/10" in str(bar)  # not "10/?": the total and hence an ETA are shown
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    _, bar = _fit(tmp_path, 17, ckpt_path=tmp_path / "last.ckpt")
    assert (bar.n, bar.total, bar.initial) == (17, 17, 10)  # the rate counts this session's 7 steps only


def test_the_bar_counts_optimizer_steps_not_batches_under_gradient_accumulation(tmp_path):
    _, bar = _fit(tmp_path, 6, accumulate=2)  # 12 batches
    assert (bar.n, bar.total) == (6, 6)
