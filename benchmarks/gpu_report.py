"""The GPU check: `pytest -m gpu` and the GPU benchmarks in one run of under 8 minutes, written as markdown tables.

    python benchmarks/gpu_report.py                            # on one CUDA GPU; tables into benchmarks/results/
    python benchmarks/gpu_report.py --sections train sample    # some parts only (tests train sample deepcache)
    python benchmarks/gpu_report.py --cpu-smoke --out /tmp/gpu-smoke   # tiny sizes on the CPU: the script runs

Each part prints its table and writes it to --out as <part>_gpu.md (<part>_smoke.md under --cpu-smoke, which writes
nothing without --out):
  tests      every gpu-marked test: outcome, seconds, the reason of a skip or failure
  train      images/s of a whole training step (bf16 autocast, clip at 1, fused Adam, EMA, torch.compile) of
             ours and of diffusers' UNet2DModel on the DDPM CIFAR-10 UNet at batch 128; train.py's loop (in-memory
             data, EMA, logging) against the bare step; MFU against the GPU's dense bf16 peak
  sample     DDIM-100 at batch 500 in bf16: ours eager and compiled against diffusers' DDIMPipeline
  deepcache  DeepCache at 100 DDIM steps, N = 2, 3, 5, 10: measured speed-up, MACs ratio, the paper's
All figures come from this one process and run (warm-up first; CUDA events or a drained queue around the timed
work), so compare the ratios, not figures from different runs. Optional extras (channels-last, CUDA graphs,
diffusers' other settings) are skipped once --budget-min is spent.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: train.py, benchmarks.* from the root
from benchmarks.gpu_sampling import deepcache_rows, sampling_rows
from benchmarks.testbed import CIFAR10, PARAMS, Eps, diffusers_unet, jittered, machine
from benchmarks.train_loop import bare_rate, loop_and_bare, step_flops
from diffusion.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "train", "sample", "deepcache")
TITLES = {"tests": "`pytest -m gpu`", "train": "Training", "sample": "Sampling", "deepcache": "DeepCache"}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s. The first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first. Other GPUs: --peak-tflops.
PEAK_BF16 = [
    ("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H200", 989), ("H100", 989), ("H800", 989),
    ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10", 125),
]  # fmt: skip
# conf/model/unet_tiny.yaml at 16x16: the smoke run's network
TINY = dict(
    ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, resolution=16, norm_groups=8
)
SIZES = {  # name: (the real run on a GPU, --cpu-smoke)
    "model": ("unet_cifar10", "unet_tiny"), "image_size": (32, 16), "compile": (True, False),
    "train_batch": (128, 4), "workers": (6, 0), "images": (2048, 64), "warmup": (10, 1), "train_steps": (50, 2),
    "probe_steps": (5, 1),
    "sample_batch": (500, 2), "sample_steps": (100, 4), "repeats": (2, 1),
    "cache_steps": (100, 6), "intervals": ([2, 3, 5, 10], [2, 3]),
}  # fmt: skip


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None."""
    return next((tflops for key, tflops in PEAK_BF16 if key in name), None)


# ---------------------------------------------------------------- tests


def gpu_tests_table(args: argparse.Namespace) -> list[str]:
    """`pytest -m gpu` in a subprocess; one row per test, read from its JUnit XML."""
    command = ["pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *args.tests]
    with tempfile.TemporaryDirectory(prefix="gpu_report-") as tmp:
        xml = Path(tmp) / "junit.xml"
        try:
            done = subprocess.run(
                [sys.executable, "-m", *command, f"--junitxml={xml}"],
                cwd=ROOT,
                env={**os.environ, "WANDB_MODE": "offline"},
                capture_output=True,
                text=True,
                timeout=args.tests_timeout,
            )
        except subprocess.TimeoutExpired as timeout:
            tail = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else timeout.stdout
            message = f"`{' '.join(command)}` did not finish in {args.tests_timeout} s (--tests-timeout); its output:"
            return [message, "", *(f"    {line}" for line in (tail or "").splitlines()[-40:])]
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
        rows = [_case_row(case) for case in ET.parse(xml).getroot().iter("testcase")] if xml.is_file() else []
    lines = [f"`{' '.join(command)}`: exit code {done.returncode}", ""]
    if not rows:
        return [*lines, "No test ran; pytest's output:", "", *(f"    {s}" for s in done.stdout.splitlines()[-40:])]
    return [*lines, "| test | outcome | seconds | note |", "|---|---|---:|---|", *rows]


def _case_row(case: ET.Element) -> str:
    """A table row from a JUnit <testcase>: outcome, seconds, its recorded properties and the skip or failure."""
    outcome, message = "passed", ""
    for kind, name in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "skipped")):
        found = case.find(kind)
        if found is not None:
            outcome, message = name, found.get("message", "")
    notes = [f"{p.get('name')}: {p.get('value')}" for p in case.iter("property")]
    notes += [message.replace("|", "/").replace("\n", " ")[:300]] if message else []
    return f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} | {'; '.join(notes)} |"


# ---------------------------------------------------------------- train


def train_table(args: argparse.Namespace, size: dict, device: torch.device, extras) -> list[str]:
    """Ours and diffusers' bare step and train.py's loop, with the settings the loop resolved to; MFU of each."""
    trainer = "gpu" if device.type == "cuda" else "cpu"
    overrides = [
        f"model={size['model']}", f"data.image_size={size['image_size']}", f"data.batch_size={size['train_batch']}",
        f"data.num_workers={size['workers']}", f"data.num_images={size['images']}", "data.num_val=8",
        f"trainer={trainer}", f"module.compile={str(size['compile']).lower()}",
    ]  # fmt: skip
    twin = {"diffusers": lambda ours: Eps(diffusers_unet(ours))}
    run = loop_and_bare(overrides, warmup=size["warmup"], steps=size["train_steps"], bare_models=twin)
    rates, settings, batch, steps = run["rates"], run["settings"], run["batch"], run["steps"]
    label = {"ours": "ours (diffusion.unet.UNet), bare step", "diffusers": "diffusers UNet2DModel, the same step"}
    rows = [(label[k], k, rates[k]) for k in label] + [("ours in train.py's loop", "ours", rates["loop"])]
    timing = dict(batch=batch, shape=run["shape"], device=device)
    layout = {}  # channels-last over contiguous, eager: compiled and timed only where it helps
    for key, model in run["models"].items():
        probe = dict(warmup=1, steps=size["probe_steps"], **timing)
        eager = [bare_rate(model, {**settings, "compile": False}, channels_last=cl, **probe) for cl in (False, True)]
        layout[key] = eager[1] / eager[0]
        if layout[key] > 1.03 and settings["compile"] and extras():
            rate = bare_rate(model, settings, warmup=size["warmup"], steps=steps, channels_last=True, **timing)
            rows.append((f"{label[key]}, channels-last", key, rate))
    flops = {k: step_flops(m, precision=settings["precision"], **timing) / batch for k, m in run["models"].items()}
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    lines = [
        f"{run['params']:,} parameters, batch {batch}, {steps} timed steps after {size['warmup']} warm-up. The step, "
        f"as train.py's run resolved it: {', '.join(f'{k}={v}' for k, v in settings.items())}. "
        f"FLOPs per image of a forward and backward (FlopCounterMode): "
        f"{', '.join(f'{k} {f / 1e9:.2f} G' for k, f in flops.items())}; MFU against "
        f"{f'{peak:g} TFLOP/s (dense bf16)' if peak else 'an unknown peak (give --peak-tflops)'}.",
        "",
        "| step | images/s | / ours, bare step | MFU |",
        "|---|---:|---:|---:|",
    ]
    for name, key, rate in rows:
        name = f"{name}: failed (traceback above the table)" if math.isnan(rate) else name
        mfu = f"{100 * flops[key] * rate / (peak * 1e12):.1f}%" if peak else "n/a"
        lines.append(f"| {name} | {rate:.1f} | {rate / rates['ours']:.3f} | {mfu} |")
    return lines + [
        "",
        f"train.py's loop / the bare step: {rates['loop'] / rates['ours']:.3f} (goal: at least 0.95). Eager "
        f"channels-last / contiguous: {', '.join(f'{k} {v:.3f}' for k, v in layout.items())} (above 1.03 and "
        "compiling: compiled and timed in the table).",
    ]


# ---------------------------------------------------------------- sample, deepcache


def sample_table(size: dict, model: UNet, device: torch.device, extras) -> list[str]:
    """DDIM images/s of ours (eager, compiled) and diffusers' DDIMPipeline on the same weights."""
    rows = sampling_rows(
        model, batch=size["sample_batch"], steps=size["sample_steps"], device=device, compile=size["compile"],
        repeats=size["repeats"], extras=extras,
    )  # fmt: skip
    lines = [
        f"DDIM, {size['sample_steps']} leading steps, eta 0, x0 clipped, batch {size['sample_batch']}; the network "
        "under bf16 autocast and the sampler in fp32 (bf16 weights: all in bf16); median of "
        f"{size['repeats']} runs after a warm-up run. RMS difference: of the images in [0, 1] from ours eager, "
        "all from the same x_T.",
        "",
        "| setting | images/s | / ours, eager | RMS difference |",
        "|---|---:|---:|---:|",
    ]
    return lines + [f"| {name} | {rate:.1f} | {rate / rows[0][1]:.3f} | {rms:.4f} |" for name, rate, rms in rows]


def deepcache_table(size: dict, model: UNet, device: torch.device) -> list[str]:
    """DeepCache's measured speed-up at each N next to its MACs ratio and the paper's figure."""
    rows = deepcache_rows(
        model, batch=size["sample_batch"], steps=size["cache_steps"], intervals=size["intervals"], device=device,
        repeats=size["repeats"], dtype=torch.bfloat16,
    )  # fmt: skip
    lines = [
        f"DDIM, {size['cache_steps']} leading steps, batch {size['sample_batch']}, the network under bf16 autocast; "
        f"DeepCache at its default branch, uniform 1:N; best of {size['repeats']} interleaved runs. The paper: "
        "Ma et al. 2024, CIFAR-10, 100 DDIM steps.",
        "",
        "| N | full / cached calls | seconds | speed-up | MACs speed-up | the paper's speed-up | mean abs diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, full, cached, secs, speedup, macs, paper, diff in rows:
        paper = f"{paper:.2f}x" if paper else ""
        name = n or "no cache"
        lines.append(
            f"| {name} | {full} / {cached} | {secs:.2f} | {speedup:.2f}x | {macs:.2f}x | {paper} | {diff:.4f} |"
        )
    return lines


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run the chosen parts, print each table and write it to --out; returns the texts by part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/ (--cpu-smoke: none)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="what `pytest -m gpu` collects")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds for `pytest -m gpu`")
    parser.add_argument("--budget-min", type=float, default=6.5, help="skip optional extras once this is spent")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU: run this on a GPU machine, or pass --cpu-smoke to check it on the CPU")
    out = args.out if args.out or args.cpu_smoke else ROOT / "benchmarks" / "results"
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    size = {key: value[args.cpu_smoke] for key, value in SIZES.items()}
    started = time.perf_counter()

    def extras() -> bool:
        return time.perf_counter() - started < 60 * args.budget_min

    torch.manual_seed(0)
    model = jittered(UNet(**(TINY if args.cpu_smoke else CIFAR10)))  # for sampling: non-zero eps, any weights
    if not args.cpu_smoke and sum(p.numel() for p in model.parameters()) != PARAMS:
        raise AssertionError(f"testbed.CIFAR10 no longer builds the {PARAMS:,}-parameter DDPM CIFAR-10 UNet")
    parts = {
        "tests": lambda: gpu_tests_table(args),
        "train": lambda: train_table(args, size, device, extras),
        "sample": lambda: sample_table(size, model, device, extras),
        "deepcache": lambda: deepcache_table(size, model, device),
    }
    command = " ".join(["python benchmarks/gpu_report.py", *(sys.argv[1:] if argv is None else argv)])
    texts, failed = {}, []
    for name in args.sections:
        begin = time.perf_counter()
        try:
            lines = parts[name]()
        except Exception:  # one part failing must not cost the others: its traceback goes into its table
            print(trace := traceback.format_exc(), file=sys.stderr)
            lines = ["This part failed:", "", *(f"    {line}" for line in trace.splitlines())]
        if lines[0].startswith("This part failed") or (name == "tests" and not lines[0].endswith("exit code 0")):
            failed.append(name)
        when = f"{time.strftime('%Y-%m-%d')}, this part {time.perf_counter() - begin:.0f} s"
        texts[name] = "\n".join([f"# {TITLES[name]}: {machine(device)}", "", f"`{command}` ({when})", "", *lines])
        print(texts[name] + "\n")
        if out:  # each part as soon as it is done: a later failure loses nothing
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}_{'smoke' if args.cpu_smoke else 'gpu'}.md").write_text(texts[name] + "\n")
    print(f"gpu_report: {time.perf_counter() - started:.0f} s in all" + (f"; tables in {out}/" if out else ""))
    if failed:
        raise SystemExit(f"gpu_report: failed: {', '.join(failed)} (see the tables)")
    return texts


if __name__ == "__main__":
    main()
