"""Resume: the checkpoint's config is the base, today's command line may only change what is safe to change.

Forgetting `experiment=...` on `resume=PATH` must not train another model, schedule or data under the old weights,
and must not quietly switch to today's defaults for the learning rate or max_steps. So the run-defining sections come
from the checkpoint (built only from this project's registry: nothing in a file is code); an override that would change
them is refused; other values (max_steps, intervals, ...) come from the checkpoint unless overridden, and every
difference is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import UsageError
from ..io import registry
from ..io.checkpoints import Checkpoints
from ..training.callbacks import FID, SampleGrid, StepProgressBar

__all__ = ["Continued", "continue_run", "builder", "command_line_overrides", "explicit_keys", "CALLBACKS"]

# The teacher's identity is its weights' digest (run-defining); its path may change when the file moves.
RUN_DEFINING = ("model", "schedule", "data", "optim", "module", "seed", "consistency", "teacher_digest", "conditional")
OPTIONAL = ("consistency", "teacher_digest", "conditional")  # absent from older checkpoints: null
REGISTRY_KINDS = ("model", "schedule", "data", "optim")
CHANGEABLE = {"data.num_workers", "data.root", "data.download", "module.compile", "module.max_bad_steps"}
NEVER_FROM_CHECKPOINT = {"paths", "resume", "run_id", "run_name", "hydra", "teacher"}


# The callbacks a checkpoint's config may bring back (one the run had that today's config lacks), by the `_target_`
# conf/ writes, and by the one it wrote before the package was laid out anew (2026-12): diffusion.io.registry builds
# them from this table, never from an import path.
CALLBACKS: dict[str, Callable] = {
    "diffusion.io.checkpoints.Checkpoints": Checkpoints, "diffusion.training.callbacks.SampleGrid": SampleGrid,
    "diffusion.training.callbacks.FID": FID, "diffusion.training.callbacks.StepProgressBar": StepProgressBar,
    "diffusion.checkpoints.Checkpoints": Checkpoints, "diffusion.callbacks.SampleGrid": SampleGrid,
    "diffusion.callbacks.FID": FID, "diffusion.callbacks.StepProgressBar": StepProgressBar,
}  # fmt: skip


@dataclass(frozen=True)
class Continued:
    """What continue_run did: `notes` to print, and the config keys whose sections came from the checkpoint
    (`from_file`: train.py builds those through diffusion.io.registry, never through Hydra's instantiate)."""

    notes: list[str]
    from_file: frozenset[str]


def command_line_overrides() -> list[str] | None:
    """This job's command-line overrides (`key=value`, `group=option`), or None when not run through Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def continue_run(cfg: DictConfig, saved: dict[str, Any], overrides: list[str] | None) -> Continued:
    """Turn `cfg` into the config of the run that wrote `saved` plus today's allowed `overrides`; returns what was
    taken from where. Raises UsageError naming every override that would change the run.

    `overrides` None (no Hydra command line): every value of `cfg` counts as asked for. `saved` must have passed
    diffusion.io.checkpoints.load (plain data, no `${`), so nothing put into `cfg` here can resolve into code.
    """
    if not isinstance(saved, dict):
        raise UsageError("the checkpoint's config is not a mapping: it was not written by train.py")
    explicit = _explicit(overrides)
    notes, conflicts, from_file = [], [], set(REGISTRY_KINDS)
    today = OmegaConf.to_container(cfg, resolve=True)  # before any section is replaced
    with open_dict(cfg):
        for section in RUN_DEFINING:
            if section not in saved and section in OPTIONAL:
                saved = {**saved, section: None}
            if section not in saved:
                raise UsageError(f"the checkpoint's config has no '{section}': it was not written by train.py")
            if section in REGISTRY_KINDS:
                registry.check(section, saved[section], where=f"checkpoint config {section}")
            else:
                _check_plain_section(section, saved[section])
            for key, ours, theirs in _differences(section, today.get(section), saved[section]):
                if key in CHANGEABLE and explicit(key):
                    notes.append(f"{key}: {_show(ours)} (command line; the run had {_show(theirs)})")
                elif explicit(key):
                    conflicts.append(f"{key}: the run has {_show(theirs)}, the command line asks for {_show(ours)}")
                else:
                    notes.append(f"{key}: {_show(theirs)} from the checkpoint (today's default: {_show(ours)})")
            kept = {key: OmegaConf.select(cfg, key) for key in CHANGEABLE if key.startswith(f"{section}.")}
            cfg[section] = saved[section]
            for key, value in kept.items():
                if explicit(key) and value is not None:
                    OmegaConf.update(cfg, key, value, force_add=True)
        if conflicts:
            raise UsageError(
                "resume would change the run: " + "; ".join(conflicts) + ". Drop these overrides to continue the "
                "run as it was, or start a new run (without resume=) to train something else"
            )
        notes += _continue_teacher(cfg, saved, explicit)
        notes += _restore_callbacks(cfg, saved, explicit, from_file)
        for key, ours, theirs in _settings_to_continue(cfg, saved):
            if explicit(key):
                notes.append(f"{key}: {_show(ours)} (command line; the run had {_show(theirs)})")
            else:
                OmegaConf.update(cfg, key, theirs)
                notes.append(f"{key}: {_show(theirs)} from the checkpoint (today's default: {_show(ours)})")
        cfg.run_id = saved.get("run_id") if isinstance(saved.get("run_id"), str) else None
    return Continued(notes, frozenset(from_file))


def _continue_teacher(cfg: DictConfig, saved: dict[str, Any], explicit: Callable[[str], bool]) -> list[str]:
    """A distillation run keeps its teacher's path unless the command line moves it (teacher=NEW): either way the
    teacher that loads must have the run's teacher_digest (diffusion.training.consistency.adopt_teacher checks)."""
    theirs = saved.get("teacher")
    if theirs is not None and not isinstance(theirs, str):
        raise UsageError(f"the checkpoint's teacher={theirs!r} is not a path: it was not written by train.py")
    if explicit("teacher") and cfg.get("teacher") != theirs:
        if theirs is None:
            return []  # no teacher in the run: consistency.method (from the checkpoint) decides what teacher= means
        return [f"teacher: {cfg.teacher!r} (command line; the run had {theirs!r}): taken if its weights are the "
                "run's teacher's"]  # fmt: skip
    cfg.teacher = theirs
    return [f"teacher: {theirs!r} from the checkpoint"] if theirs is not None else []


def _restore_callbacks(cfg: DictConfig, saved: dict[str, Any], explicit: Callable[[str], bool],
                       from_file: set[str]) -> list[str]:  # fmt: skip
    """The run's callbacks as they were: one it ran without is dropped (a run with `~callbacks.progress` resumes
    without the bar), one it had that today's config lacks comes back from the checkpoint (through the registry:
    `from_file`), unless the command line names it. Their plain values follow in _settings_to_continue."""
    theirs = saved.get("callbacks") if "callbacks" in saved else cfg.get("callbacks")
    if theirs is not None and not isinstance(theirs, dict):
        raise UsageError("the checkpoint's config 'callbacks' is not a mapping: it was not written by train.py")
    theirs, notes = theirs or {}, []
    if cfg.get("callbacks") is None:
        cfg.callbacks = {}
    for name in [n for n in cfg.callbacks if n not in theirs and not explicit(f"callbacks.{n}")]:
        del cfg.callbacks[name]
        notes.append(f"callbacks.{name}: off, as in the run")
    for name, section in theirs.items():
        if name not in cfg.callbacks and not explicit(f"callbacks.{name}"):
            where = f"checkpoint config callbacks.{name}"
            registry.check("callbacks", section, where=where, builders=CALLBACKS)
            cfg.callbacks[name] = section
            from_file.add(f"callbacks.{name}")
            notes.append(f"callbacks.{name}: {section['_target_']} from the checkpoint")
    return notes


def _settings_to_continue(cfg: DictConfig, saved: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(key, today, saved) for plain values outside the run-defining sections that differ, where today's config has
    the same key as a plain, non-interpolated value (so no object, path or `_target_` is taken from the file)."""
    for section, value in saved.items():
        if section in RUN_DEFINING or section in NEVER_FROM_CHECKPOINT or section not in cfg:
            continue
        for key, theirs in _leaves(section, value):
            parent, _, name = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if name.startswith("_") or not isinstance(node, DictConfig) or name not in node:
                continue
            if OmegaConf.is_interpolation(node, name) or not registry.is_plain(theirs):
                continue
            ours = node[name]
            if registry.is_plain(ours) and ours != theirs:
                yield key, ours, theirs


def _differences(prefix: str, ours: Any, theirs: Any) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs), key=str):
            yield from _differences(f"{prefix}.{key}", ours.get(key), theirs.get(key))
    elif ours != theirs:
        yield prefix, ours, theirs


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if isinstance(key, str) and key.isidentifier():
                yield from _leaves(f"{prefix}.{key}", inner)
    else:
        yield prefix, value


def _check_plain_section(section: str, value: Any) -> None:
    """A section outside the registry (module: numbers and flags; seed) holds plain values only."""
    where = f"checkpoint config {section}"
    if isinstance(value, dict):
        for key, inner in value.items():
            registry.check_plain(inner, f"{where}.{key}")
    else:
        registry.check_plain(value, where)


def explicit_keys(overrides: list[str]) -> list[str]:
    """The config keys a Hydra command line names: `a.b=1`, `+a.b=1`, `~a.b` -> a.b; `model=x` -> model."""
    return [o.split("=", 1)[0].lstrip("+~").split("@", 1)[0] for o in overrides]


def _explicit(overrides: list[str] | None) -> Callable[[str], bool]:
    """key -> whether the command line set it: `a.b=1` sets a.b and below, `model=x` all of model, and an
    `experiment=x` preset everything (it may set any key)."""
    if overrides is None:
        return lambda key: True
    keys = explicit_keys(overrides)
    if "experiment" in keys:
        return lambda key: True
    return lambda key: any(key == k or key.startswith(f"{k}.") for k in keys)


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


def builder(cfg: DictConfig, from_file: frozenset[str] | set[str]) -> Callable[[str], Any]:
    """build(key) -> the object of cfg's section `key` ("model", "callbacks.samples", ...): through
    diffusion.io.registry with checked plain values when the section came from a file (`from_file`: a checkpoint,
    a teacher), through Hydra's instantiate when it is the user's own config (where a `_target_` of the user's is
    theirs to name)."""

    def build(key: str) -> Any:
        section = OmegaConf.select(cfg, key)
        if key not in from_file:
            return instantiate(section, _convert_="all")
        kind = key.split(".")[0]
        config = OmegaConf.to_container(section, resolve=True)
        where = f"checkpoint config {key}"
        return registry.build(kind, config, where=where, builders=CALLBACKS if kind == "callbacks" else None)

    return build
