"""Build this project's objects from a config read from a file (a checkpoint's, a data config) without running code.

A config names what to build with `_target_`. Here that name is only a key into REGISTRY, whose values are objects
imported in this module: nothing is imported from a string, so a crafted `_target_` (`os.system`, a method path such
as `diffusion.io.pretrained.Path.write_text`, a module re-exported by one of ours) names nothing. The other keys must be
parameters of the builder and their values plain (None, bool, int, float, str, lists of those), so no nested
`_target_`, `_args_`, `_partial_` or `_recursive_` can make one call into another. The names are the ones conf/ uses
today, so every checkpoint train.py has written keeps loading.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..data import CIFAR10, CelebA, ImageFolder
from ..errors import UsageError
from ..plain import UnsafeConfigError, check_file_data, check_plain, is_plain
from ..schedule import cosine, linear, quadratic, sigmoid
from ..synthetic import Mixture, Synthetic
from ..unet import UNet

__all__ = ["REGISTRY", "UnsafeConfigError", "build", "check", "check_file_data", "check_plain", "is_plain"]

# kind -> {the `_target_` conf/ writes: the object it builds}
REGISTRY: dict[str, dict[str, Callable]] = {
    "model": {"diffusion.unet.UNet": UNet},
    "schedule": {
        "diffusion.schedule.linear": linear,
        "diffusion.schedule.cosine": cosine,
        "diffusion.schedule.quadratic": quadratic,
        "diffusion.schedule.sigmoid": sigmoid,
    },
    "data": {
        "diffusion.data.CIFAR10": CIFAR10,
        "diffusion.data.CelebA": CelebA,
        "diffusion.data.ImageFolder": ImageFolder,
        "diffusion.synthetic.Synthetic": Synthetic,
        "diffusion.synthetic.Mixture": Mixture,
    },
    "optim": {"torch.optim.Adam": torch.optim.Adam, "torch.optim.AdamW": torch.optim.AdamW},
}
# Kinds built as a functools.partial, as conf/optim's `_partial_: true`: the caller passes these arguments later.
PARTIAL = {"optim": ("params",)}


def build(
    kind: str, config: Mapping, *, where: str | None = None, builders: Mapping[str, Callable] | None = None
) -> Any:
    """The object `config` describes, from REGISTRY[kind] (or `builders`, a table of a higher layer's own, such as
    train.py's callbacks) with checked plain arguments (a partial for "optim").

    `where` names the config in messages, e.g. "checkpoint config model" (default: `kind`)."""
    kwargs = check(kind, config, where=where, builders=builders)
    where, target = where or kind, config["_target_"]
    builder = (REGISTRY[kind] if builders is None else builders)[target]
    if kind in PARTIAL:
        return functools.partial(builder, **kwargs)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as error:  # e.g. UNet's own argument checks
        raise UsageError(f"cannot build {where} ({target}) from its config: {error}") from error


def check(
    kind: str, config: Mapping, *, where: str | None = None, builders: Mapping[str, Callable] | None = None
) -> dict:
    """The keyword arguments `config` gives REGISTRY[kind][config["_target_"]] (or builders[...]), or
    UnsafeConfigError naming the key."""
    if builders is None and kind not in REGISTRY:
        raise ValueError(f"unknown kind {kind!r}: the registry holds {', '.join(REGISTRY)}")
    table = REGISTRY[kind] if builders is None else builders
    where = where or kind
    if not isinstance(config, Mapping):
        raise UnsafeConfigError(f"{where} is a {type(config).__name__}, not a mapping with _target_ and arguments")
    names = ", ".join(table)
    target = config.get("_target_")
    if target is None:
        raise UnsafeConfigError(f"{where}._target_ is missing: name one of: {names}")
    if type(target) is not str or target not in table:
        raise UnsafeConfigError(
            f"{where}._target_={target!r} is not one of: {names} (a config read from a file can only name this "
            "project's own builders, never an import path)"
        )
    for key in config:
        if type(key) is not str:
            raise UnsafeConfigError(f"{where} has the key {key!r}: keys must be argument names (strings)")
    special = [k for k in config if k.startswith("_") and k != "_target_"]
    if kind in PARTIAL and "_partial_" in special and config["_partial_"] is True:
        special.remove("_partial_")  # conf/optim's own form: the caller passes the parameters later
    if special:
        keys = ", ".join(f"{where}.{k}" for k in special)
        raise UnsafeConfigError(
            f"{keys}: Hydra's special keys (other than _target_) are refused in a config read from a file, as they "
            "would build or call more than the named object; remove them"
        )
    parameters = _parameters(table[target], skip=PARTIAL.get(kind, ()))
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = [k for k in arguments if k not in parameters]
    if unknown:
        keys = ", ".join(f"{where}.{k}" for k in unknown)
        raise UnsafeConfigError(f"{keys}: not a parameter of {target}, which takes {', '.join(parameters)}")
    for key, value in arguments.items():
        check_plain(value, f"{where}.{key}")
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in arguments]
    if missing:
        raise UnsafeConfigError(f"{where} lacks {', '.join(missing)}, which {target} needs")
    return copy.deepcopy(arguments)  # plain values only, so the copy runs no code


def _parameters(builder: Callable, skip: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """The keyword parameters of `builder`; a class's **kwargs are followed into its bases' __init__, where ours
    pass them on (CIFAR10(root, download, **kwargs) takes ImageData's image_size, batch_size, ...)."""
    is_class = isinstance(builder, type)
    functions = [c.__init__ for c in builder.__mro__ if "__init__" in vars(c)] if is_class else [builder]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found: dict[str, inspect.Parameter] = {}
    for function in functions:
        signature = inspect.signature(function).parameters
        for name, parameter in signature.items():
            if parameter.kind in kinds and name != "self" and name not in skip:
                found.setdefault(name, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            break
    return found
