"""benchmarks/gpu_report.py off the GPU: --cpu-smoke runs the training, sampling and DeepCache parts at tiny sizes
and writes their tables only where --out says; the tests part turns pytest's JUnit XML into a table."""

from __future__ import annotations

import argparse
import math
import textwrap

import pytest
import torch

from benchmarks.gpu_report import gpu_tests_table, main

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every row of the markdown tables in `text` (header and rule left out)."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    headers = ("step", "setting", "N", "test")
    return {row[0]: row[1:] for row in cells if not set(row[1]) <= {"-", ":"} and row[0] not in headers}


def test_cpu_smoke_runs_every_benchmark_part_and_writes_only_to_out(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    texts = main(["--cpu-smoke", "--sections", "train", "sample", "deepcache", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepcache_smoke.md", "sample_smoke.md", "train_smoke.md"]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before

    train = rows(texts["train"])
    for name in ("ours (diffusion.unet.UNet), bare step", "diffusers UNet2DModel, the same step",
                 "ours in train.py's loop"):  # fmt: skip
        rate, relative, mfu = train[name][:3]
        assert float(rate) > 0 and math.isfinite(float(relative)) and mfu == "n/a"  # no peak for a CPU
    assert "clip=1.0" in texts["train"] and "ema_decay=" in texts["train"]  # the step the loop resolved to

    sample = rows(texts["sample"])
    assert float(sample["ours, eager"][0]) > 0
    # the same weights and x_T through diffusers' DDIMPipeline: the same images, up to bf16 rounding
    assert float(sample["diffusers DDIMPipeline, autocast"][2]) < 0.02

    cache = rows(texts["deepcache"])  # 6 steps: N = 2 runs 3 full calls and 3 cached ones, N = 3 runs 2 and 4
    assert cache["no cache"][0] == "6 / 0" and cache["2"][0] == "3 / 3" and cache["3"][0] == "2 / 4"
    assert 1 < float(cache["2"][3].rstrip("x")) < float(cache["3"][3].rstrip("x"))  # MACs speed-up grows with N


def test_the_tests_part_reports_each_gpu_test_with_its_outcome_and_note(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SUITE_HAS_NO_GPU", "1")  # the fake suite's skip condition, as a real gpu test's
    suite = tmp_path / "test_fake.py"
    suite.write_text(
        textwrap.dedent("""
        import os

        import pytest

        pytestmark = pytest.mark.gpu

        def test_fine(record_property):
            record_property("inception", "random weights")

        @pytest.mark.skipif(os.environ.get("FAKE_SUITE_HAS_NO_GPU") == "1", reason="needs a CUDA GPU")
        def test_skipped():
            pass

        def test_broken():
            assert 1 == 2, "one is not two"

        @pytest.mark.slow
        def test_also_slow():
            pass
    """)
    )
    (tmp_path / "test_unmarked.py").write_text("def test_cpu_only():\n    pass\n")
    args = argparse.Namespace(tests=[str(tmp_path)], tests_timeout=120)
    table = rows("\n".join(gpu_tests_table(args)))
    assert set(table) == {"test_fine", "test_skipped", "test_broken", "test_also_slow"}  # gpu-marked only
    assert table["test_fine"][0] == "passed" and table["test_fine"][2] == "inception: random weights"
    assert table["test_skipped"][0] == "skipped" and "needs a CUDA GPU" in table["test_skipped"][2]
    assert table["test_broken"][0] == "FAILED" and "one is not two" in table["test_broken"][2]


def test_without_a_gpu_the_report_says_to_use_a_gpu_or_cpu_smoke(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--sections", "train"])
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--cpu-smoke" in err
