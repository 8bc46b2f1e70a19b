"""The consistency students' rows in quality_vs_steps.py's tables: benchmarks/consistency_mixture.py's JSON, read
as plain data and checked key by key (DESIGN principle 7: nothing read from a file is code), and their markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path

from diffusion.errors import UsageError
from diffusion.mixture import GaussianMixture
from diffusion.schedule import Schedule

STUDENT_KEYS = {"method": str, "steps": int, "nfe": int, "fd": float, "rms": float, "other_mode": float}


def read_students(path: Path, sched: Schedule, data: GaussianMixture, seed: int = 0,
                  ours: Collection[str] = ()) -> tuple[list[dict], str]:  # fmt: skip
    """(rows, note) from benchmarks/consistency_mixture.py's JSON: {"schedule", "shape", "samples", "rows": [{method,
    steps, nfe, fd, rms, other_mode (a fraction)}, ...]}, optionally "seed" (image_mixture's; 0 if absent). Plain
    data, checked key by key (UsageError naming the first problem; other keys are ignored); no rows, said why, when
    the file is absent or made for another schedule, shape or mixture seed. Its rows whose method is in `ours` (the
    table's own samplers as "<row name> (<spacing>)": its baselines) are left out, said so: the table measures them
    itself. A row "noise floor..." with steps = nfe = 0 is its noise floor ("floor": True), shown in the table, not
    plotted."""
    if not path.exists():
        return [], ""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not readable JSON ({error}); rerun benchmarks/consistency_mixture.py") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UsageError(f"{path}: {what}; rerun benchmarks/consistency_mixture.py or pass --consistency none")

    need(isinstance(doc, dict), f"the top level must be an object, got {type(doc).__name__}")
    for key, kind in (("schedule", str), ("shape", list), ("samples", int), ("rows", list)):
        need(key in doc and _is(doc[key], kind), f'"{key}" must be a {kind.__name__}, got {doc.get(key)!r}')
    need(all(_is(n, int) and n > 0 for n in doc["shape"]), f'"shape" must hold positive ints, got {doc["shape"]}')
    need(doc["samples"] >= 2 and len(doc["rows"]) > 0, '"samples" must be >= 2 and "rows" not empty')
    for i, row in enumerate(doc["rows"]):
        need(isinstance(row, dict), f"rows[{i}] must be an object, got {type(row).__name__}")
        for key, kind in STUDENT_KEYS.items():
            need(key in row and _is(row[key], kind), f'rows[{i}]["{key}"] must be a {kind.__name__}, got '
                 f"{row.get(key)!r}")  # fmt: skip
        floor = row["method"].startswith("noise floor") and row["steps"] == row["nfe"] == 0
        need(bool(row["method"].strip()) and (floor or (row["steps"] >= 1 and row["nfe"] >= 1)), f"rows[{i}]: empty "
             "method or a count below 1 (0 and 0 only for a 'noise floor' row)")  # fmt: skip
        need(row["fd"] >= 0 and row["rms"] >= 0 and 0 <= row["other_mode"] <= 1, f"rows[{i}]: fd and rms must be "
             f"finite and >= 0, other_mode a fraction in [0, 1]")  # fmt: skip
    need(_is(doc.get("seed", 0), int), f'"seed" must be an int, got {doc.get("seed")!r}')
    mine, theirs = (sched.name, list(data.shape), seed), (doc["schedule"], doc["shape"], doc.get("seed", 0))
    if theirs != mine:
        return [], (f"Consistency students: {path.name} is for the {theirs[0]} schedule, shape {theirs[1]} and mixture "
                    f"seed {theirs[2]}, not {mine[0]}, {mine[1]} and {mine[2]}: not shown.")  # fmt: skip
    baselines = list(dict.fromkeys(row["method"] for row in doc["rows"] if row["method"] in ours))
    note = (f"Consistency students: {path.name} ({doc['samples']} samples per row, so their own noise floor; "
            "benchmarks/consistency_mixture.py trains them)" + (f"; its rows for {', '.join(baselines)} are left out "
            "(this table's own rows)." if baselines else "."))  # fmt: skip
    rows = [row for row in doc["rows"] if row["method"] not in ours]
    return [row | {"samples": doc["samples"], "floor": row["steps"] == 0} for row in rows], note


def _is(value, kind: type) -> bool:
    """JSON's value is of `kind` (bools are not numbers; an int is a float; floats are finite)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def students_markdown(students: Sequence[dict]) -> list[str]:
    """The students' table, below the samplers': one row per (method, steps)."""
    if not students:
        return []
    lines = ["", f"Consistency students, exact teacher ({students[0]['samples']} samples): Frechet distance / "
             "paired RMS per pixel to the exact ODE endpoint / share of samples on another mode.", "",
             "| method | steps | NFE | Frechet | paired RMS | other mode |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(students, key=lambda r: r["floor"]):  # the floor last, as in the samplers' table
        counts = "| | |" if r["floor"] else f"| {r['steps']} | {r['nfe']} |"
        paired = "| | |" if r["floor"] else f"| {r['rms']:.3f} | {100 * r['other_mode']:.1f}% |"
        lines.append(f"| {r['method']} {counts} {r['fd']:.3g} {paired}")
    return lines
