"""The one matching rule: which module (or parameter) names a config entry selects.

PEFT's rules, written once:

* a name entry matches a module whose full dotted name *is* the entry or *ends in* ``.<entry>``
  (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``; never a plain substring);
* a string spec is a regex that must match the full name (``re.fullmatch``);
* a module is *inside* an entry when it or one of the modules that contain it matches it;
* ``layers_to_transform`` keeps the names whose index after ``.<layers_pattern>.`` is listed;
* a ``rank_pattern`` / ``alpha_pattern`` key ``k`` applies when ``re.match(rf"(.*\\.)?({k})$", name)``
  (the first such key wins).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

Spec = Union[str, Sequence[str], None]


def matches(name: str, entry: str) -> bool:
    """``name`` is ``entry`` or ends in ``.<entry>``."""
    return name == entry or name.endswith("." + entry)


def matches_any(name: str, entries: Iterable[str]) -> bool:
    return any(matches(name, e) for e in entries)


def matches_spec(name: str, spec: Spec) -> bool:
    """A list spec: :func:`matches_any`; a string: a regex matching the whole name; None: nothing."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return matches_any(name, spec)


def inside(name: str, entries: Iterable[str]) -> bool:
    """Does ``name``, or a module that contains it, match one of ``entries``?"""
    entries = list(entries)
    parts = name.split(".")
    return any(matches_any(".".join(parts[:i]), entries) for i in range(1, len(parts) + 1))


def unmatched(entries: Iterable[str], names: Iterable[str]) -> list[str]:
    """The entries that match none of ``names``."""
    names = list(names)
    return [e for e in entries if not any(matches(n, e) for n in names)]


def layer_index(name: str, layers_pattern: Spec) -> int | None:
    """The layer index in ``name``: the number after ``.<layers_pattern>.`` (or after any
    ``.<part>.`` when no pattern is given); None when there is none."""
    pats = [layers_pattern] if isinstance(layers_pattern, str) else (list(layers_pattern or []) or [None])
    for pat in pats:
        m = re.match(rf".*\.{pat}\.(\d+)\." if pat else r".*\.[^.]*\.(\d+)\.", name)
        if m is None and pat:  # a top-level module list, e.g. "layers.0.attn"
            m = re.match(rf"{pat}\.(\d+)\.", name)
        if m is not None:
            return int(m.group(1))
    return None


def in_layers(name: str, layers_to_transform: Union[int, Sequence[int], None], layers_pattern: Spec) -> bool:
    """``layers_to_transform`` (None: every layer) keeps ``name``?"""
    if layers_to_transform is None:
        return True
    idx = layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return idx is not None and idx in wanted


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first ``rank_pattern`` / ``alpha_pattern`` key that applies to ``name`` (PEFT's rule), or None."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None
