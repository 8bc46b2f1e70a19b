"""Resume: the checkpoint's config is the base, today's command line may only change what is safe to change.

Forgetting `experiment=...` on `resume=PATH` must not train another model, schedule or data under the old weights,
and must not quietly switch to today's defaults for the learning rate or max_steps. So the run-defining sections come
from the checkpoint (built only from this project's registry: nothing in a file is code); an override that would change
them is refused; other values (max_steps, intervals, ...) come from the checkpoint unless overridden, and every
difference is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from . import registry
from .errors import UsageError

__all__ = ["continue_run", "command_line_overrides"]

RUN_DEFINING = ("model", "schedule", "data", "optim", "module", "seed", "consistency", "teacher")
OPTIONAL = ("consistency", "teacher")  # absent from checkpoints written before consistency models: null
REGISTRY_KINDS = ("model", "schedule", "data", "optim")
CHANGEABLE = {"data.num_workers", "data.root", "data.download", "module.compile", "module.max_bad_steps"}
NEVER_FROM_CHECKPOINT = {"paths", "resume", "run_id", "run_name", "hydra"}


def command_line_overrides() -> list[str] | None:
    """This job's command-line overrides (`key=value`, `group=option`), or None when not run through Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def continue_run(cfg: DictConfig, saved: dict[str, Any], overrides: list[str] | None) -> list[str]:
    """Turn `cfg` into the config of the run that wrote `saved` plus today's allowed `overrides`; returns what was
    taken from where, as lines to print. Raises UsageError naming every override that would change the run.

    `overrides` None (no Hydra command line): every value of `cfg` counts as asked for.
    """
    if not isinstance(saved, dict):
        raise UsageError("the checkpoint's config is not a mapping: it was not written by train.py")
    explicit = _explicit(overrides)
    notes, conflicts = [], []
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
        for key, ours, theirs in _settings_to_continue(cfg, saved):
            if explicit(key):
                notes.append(f"{key}: {_show(ours)} (command line; the run had {_show(theirs)})")
            else:
                OmegaConf.update(cfg, key, theirs)
                notes.append(f"{key}: {_show(theirs)} from the checkpoint (today's default: {_show(ours)})")
        cfg.run_id = saved.get("run_id") if isinstance(saved.get("run_id"), str) else None
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


def _explicit(overrides: list[str] | None) -> Callable[[str], bool]:
    """key -> whether the command line set it: `a.b=1` sets a.b and below, `model=x` all of model, and an
    `experiment=x` preset everything (it may set any key)."""
    if overrides is None:
        return lambda key: True
    keys = [o.split("=", 1)[0].lstrip("+~").split("@", 1)[0] for o in overrides]
    if "experiment" in keys:
        return lambda key: True
    return lambda key: any(key == k or key.startswith(f"{k}.") for k in keys)


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)
