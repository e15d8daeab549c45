"""Adapter names a request may give, parsed without touching vLLM or the disk.

    code                              one adapter: the folder ``code`` of the adapter root, served as molora_ops
                                      reads it (rank and alpha patterns, rslora folded into its weights)
    blend:code=0.5,math=0.4,qa=0.1    a static blend sum_i w_i * s_i * B_i A_i (PEFT's ``cat`` combination)
    route:myrouter                    per-token top-2 mixtures of the adapters a saved router names
    route:myrouter,top_k=3            the same with top-3

Adapter and router names are folder names: letters, digits, ``_``, ``-`` and ``.``, not starting with ``.``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["BlendName", "RouteName", "PlainName", "parse_name", "BLEND_PREFIX", "ROUTE_PREFIX"]

BLEND_PREFIX = "blend:"
ROUTE_PREFIX = "route:"
DEFAULT_TOP_K = 2
_FOLDER = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class PlainName:
    adapter: str


@dataclass(frozen=True)
class BlendName:
    """(adapter, weight) pairs in the order the name gives them; zero weights dropped."""

    parts: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class RouteName:
    router: str
    top_k: int = DEFAULT_TOP_K


def _folder(name: str, what: str, full: str) -> str:
    if not _FOLDER.fullmatch(name):
        raise ValueError(f"LoRA name {full!r}: {what} {name!r} is not a folder name (letters, digits, '_', '-', "
                         "'.'; not starting with '.')")
    return name


def _weight(text: str, adapter: str, full: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"LoRA name {full!r}: the weight of {adapter!r} must be a finite number, got {text!r}")
    return value


def _parse_blend(body: str, full: str) -> BlendName:
    if not body:
        raise ValueError(f"LoRA name {full!r}: expected blend:<adapter>=<weight>,... (e.g. blend:code=0.5,math=0.5)")
    parts, seen = [], set()
    for item in body.split(","):
        adapter, eq, weight = item.partition("=")
        if not eq:
            raise ValueError(f"LoRA name {full!r}: {item!r} is not <adapter>=<weight>")
        adapter = _folder(adapter.strip(), "adapter", full)
        if adapter in seen:
            raise ValueError(f"LoRA name {full!r}: adapter {adapter!r} appears twice")
        seen.add(adapter)
        value = _weight(weight.strip(), adapter, full)
        if value != 0.0:
            parts.append((adapter, value))
    if not parts:
        raise ValueError(f"LoRA name {full!r}: every weight is 0; name the base model instead")
    return BlendName(tuple(parts))


def _parse_route(body: str, full: str) -> RouteName:
    router, _, option = body.partition(",")
    router = _folder(router.strip(), "router", full)
    if not option:
        return RouteName(router)
    key, eq, value = option.partition("=")
    if key.strip() != "top_k" or not eq or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"LoRA name {full!r}: expected route:<router> or route:<router>,top_k=<positive int>")
    return RouteName(router, int(value))


def parse_name(name: str) -> PlainName | BlendName | RouteName:
    """The parsed form of a requested LoRA name; ValueError naming the problem for a malformed one."""
    if not isinstance(name, str):
        raise TypeError(f"a LoRA name must be a str, got {type(name).__name__}")
    if name.startswith(BLEND_PREFIX):
        return _parse_blend(name[len(BLEND_PREFIX):], name)
    if name.startswith(ROUTE_PREFIX):
        return _parse_route(name[len(ROUTE_PREFIX):], name)
    return PlainName(_folder(name, "adapter", name))
