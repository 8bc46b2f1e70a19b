"""The docs say what the code does: every `python train.py ...` / `python sample.py ...` line in README.md, docs/
and benchmarks/README.md composes with Hydra exactly as written (its keys and groups exist); README's sampler table
has a row for every conf/sampler option; its layout lists every module, and only files that exist; relative links
resolve; the README stays short enough to read."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .conftest import CONF, ROOT, compose_config

PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str, list[str]]]:
    """(page:line, script, overrides) for every train.py / sample.py command line of the pages."""
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for command in line.split("&&"):
                match = re.match(r"\s*(?:srun |torchrun \S+ )?python (train|sample)\.py(.*)", command)
                if match:
                    args = shlex.split(match[2].split(" #")[0])
                    if "--cfg" in args:  # `--cfg job` prints the config: compose what precedes it
                        args = args[: args.index("--cfg")]
                    found.append((f"{page.relative_to(ROOT)}:{number}", match[1], [a for a in args if a != "-m"]))
    return found


def test_the_readme_shows_the_main_commands_and_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    found = {(script, " ".join(args)) for where, script, args in commands() if where.startswith("README.md")}
    assert ("train", "data=cifar10 schedule=cosine") in found and ("sample", "sampler=pndm steps=50") in found


@pytest.mark.parametrize("where, script, overrides", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_composes(where, script, overrides, tmp_path):
    for combination in _expand(overrides):
        assert compose_config("train" if script == "train" else "sample", combination, tmp_path), where


def _expand(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun's cartesian product of `a,b` values (`[a,b]` and `{k:a}` are one list / dict value)."""
    runs = [[]]
    for o in overrides:
        key, _, value = o.partition("=")
        values = value.split(",") if "," in value and not value.startswith(("[", "{")) else [value]
        runs = [r + [f"{key}={v}"] for r in runs for v in values]
    return runs


def test_the_sampler_table_has_a_row_for_every_sampler_config():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Samplers") :].split("\n## ")[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert rows == {p.stem for p in (CONF / "sampler").glob("*.yaml")}, rows
    for name, file in re.findall(r"^\| `(\w+)` \|[^|]*\| `(sampling/\w+\.py)`", table, flags=re.M):
        assert (ROOT / "diffusion" / file).is_file(), (name, file)


def layout() -> list[str]:
    """The paths the README's layout block lists, folders ending in /, e.g. diffusion/sampling/ddim.py."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    paths, stack = [], []
    for line in block.strip("\n").splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        stack[depth:] = [name]
        paths.append("".join(stack))
    return paths


def test_the_layout_lists_every_module_and_only_what_exists():
    listed = layout()
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, missing
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "diffusion").rglob("*.py") if p.name != "__init__.py"}
    assert not modules - set(listed), sorted(modules - set(listed))


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_every_module_path_the_pages_name_exists():
    """`diffusion/...py` paths and `python -m diffusion....` modules written in the pages are real files."""
    wrong = []
    for page in PAGES:
        text = page.read_text()
        for path in re.findall(r"\bdiffusion/[\w/]+\.py\b", text):
            if not (ROOT / path).is_file():
                wrong.append(f"{page.relative_to(ROOT)}: {path}")
        for module in re.findall(r"python -m (diffusion(?:\.\w+)+)", text):
            if not (ROOT / Path(*module.split("."))).with_suffix(".py").is_file():
                wrong.append(f"{page.relative_to(ROOT)}: {module}")
    assert not wrong, wrong


def test_every_import_line_of_the_pages_imports():
    """`from diffusion... import ...` lines in code blocks keep working after a move (or are replaced everywhere)."""
    lines = {line.strip() for page in PAGES for line in page.read_text().splitlines()
             if re.match(r"\s*(from diffusion[\w.]* import [\w, ]+|import diffusion[\w.]*)\s*$", line)}  # fmt: skip
    assert lines  # the pages show the library API
    for line in sorted(lines):
        exec(line, {})  # noqa: S102 (our own docs' import lines)
