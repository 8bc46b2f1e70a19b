"""Plain data: what a value read from a file may be (DESIGN principle 7: nothing read from a file is code).

A checkpoint's config, a diffusers folder's config.json and a statistics file's metadata are data down to their
strings. These checks run where such files are read (diffusion.io.checkpoints, diffusion.io.pretrained,
diffusion.evaluation.fid) and where their sections are built (diffusion.io.registry), and name the offending key in
one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import UsageError

__all__ = ["UnsafeConfigError", "check_file_data", "check_plain", "is_plain"]

SCALARS = (type(None), bool, int, float, str)
NUMBERS = (int, float)
MAX_DEPTH = 4  # lists in lists of a builder's argument: enough for any shape or milestone list
PLAIN = "plain values (None, bool, int, float, str, or lists of them)"
MAX_NESTING = 32  # lists and mappings in a config read from a file: ours nest 4 deep
MAX_VALUES = 100_000  # values in one such config: ours hold a few hundred (a scheduler's trained_betas: T)


class UnsafeConfigError(UsageError):
    """A config read from a file that names something outside the registry or holds more than plain values."""


def check_file_data(value: Any, where: str, key: str = "") -> None:
    """Refuse, naming the key, anything in data read from a file (a checkpoint's config, a config.json, a stats
    file's metadata) that is more than text and numbers to OmegaConf or to us. Messages read `<where>: <key>...`,
    the key a path below `key` (e.g. where = the file, key = "config": "last.ckpt: config.logger.project ...").

    OmegaConf resolves `${...}` inside any string it holds, and its resolvers run code (`oc.create` builds configs
    that `instantiate` calls, `oc.decode` parses strings into them) or read secrets (`oc.env`); a `\\${...}` is
    resolved into a live `${...}` one step later, and `???` reads as a missing value. So no string from a file may
    hold `${` or be `???`, wherever it sits. Mappings need string keys; only None, bool, int, float, str, lists and
    mappings are accepted, at most MAX_NESTING deep and MAX_VALUES in all (no bomb reaches a recursive consumer).
    """
    stack, seen = [(value, key, 0)], 0
    while stack:
        node, key, depth = stack.pop()
        at = f"{where}: {key or 'the top level'}"
        seen += 1
        if seen > MAX_VALUES:
            raise UnsafeConfigError(f"{where} holds more than {MAX_VALUES} values: not a config this project writes")
        if depth > MAX_NESTING:
            raise UnsafeConfigError(f"{at} nests {MAX_NESTING} levels deep: not a config this project writes")
        if type(node) is str:
            if "${" in node or node.strip() == "???":
                shown = node if len(node) <= 40 else node[:37] + "..."
                raise UnsafeConfigError(
                    f"{at} is {shown!r}, which OmegaConf would resolve (an interpolation or a missing value): a "
                    "value read from a file is data and is never resolved; remove it from the file"
                )
        elif isinstance(node, Mapping):
            for name, inner in node.items():
                if type(name) is not str or "${" in name:
                    raise UnsafeConfigError(f"{at} has the key {name!r}: keys read from a file are plain names")
                stack.append((inner, f"{key}.{name}" if key else name, depth + 1))
        elif type(node) in (list, tuple):
            stack.extend((inner, f"{key}[{i}]", depth + 1) for i, inner in enumerate(node))
        elif type(node) not in SCALARS:
            raise UnsafeConfigError(
                f"{at} is a {type(node).__name__}: a config read from a file holds only None, bool, int, float, "
                "str, and lists and mappings of them"
            )


def is_plain(value: Any) -> bool:
    """True for the values a config read from a file may hold (see check_plain)."""
    try:
        check_plain(value, "value")
    except UnsafeConfigError:
        return False
    return True


def check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Refuse, naming `where`, anything but None, bool, int, float, str and (nested, numbers only) lists of them."""
    if type(value) in SCALARS:
        if depth >= 2 and type(value) not in NUMBERS:
            raise UnsafeConfigError(f"{where} is a {type(value).__name__} in a nested list: only numbers nest")
        return
    if isinstance(value, Mapping):
        raise UnsafeConfigError(f"{where} is a mapping: arguments must be {PLAIN}, never nested configs")
    if type(value) not in (list, tuple):
        raise UnsafeConfigError(f"{where} is a {type(value).__name__}: arguments must be {PLAIN}")
    if depth >= MAX_DEPTH:
        raise UnsafeConfigError(f"{where} nests lists {MAX_DEPTH} deep: arguments must be {PLAIN}")
    for i, item in enumerate(value):
        check_plain(item, f"{where}[{i}]", depth + 1)
