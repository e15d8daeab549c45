"""Build, once, the PEFT folder vLLM loads for a requested name, cached on disk by content.

An adapter root is a folder whose subfolders are PEFT adapters (``adapter_config.json`` plus weights) and saved
molora_ops routers (``router.json``), each by name. For a parsed name (:mod:`molora_ops.vllm.names`) the store
writes a concatenated adapter (:mod:`molora_ops.vllm.build`) under ``<cache>/<sha256>``, where the key hashes
the bytes of every source file, the weights, the top-k and this format's version: the same request reuses the
folder, and a changed source gets a new one. Folders are written under a temporary name and renamed into place,
so concurrent builders never see a half-written adapter.

A routed adapter's folder also holds ``molora_routing.json`` and a copy of the router under ``router/``; that
marker is what the worker-side plugin looks for (:mod:`molora_ops.vllm.routed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Sequence

from ..hf.peft_io import CONFIG_NAME, load_adapter
from ..hf.routers import ROUTER_CONFIG, ROUTER_WEIGHTS, load_router
from .build import concat_adapter, segment_widths
from .names import BlendName, PlainName, RouteName

__all__ = ["AdapterStore", "ROUTING_MARKER", "ROUTER_SUBDIR", "FORMAT_VERSION"]

ROUTING_MARKER = "molora_routing.json"
ROUTER_SUBDIR = "router"
FORMAT_VERSION = 1


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_digest(path: str) -> dict[str, str]:
    """{file name: sha256} of the regular files directly in `path`."""
    return {n: _file_digest(os.path.join(path, n)) for n in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, n))}


class AdapterStore:
    """Sources under `root`, built adapters under `cache_dir`."""

    def __init__(self, root: str, cache_dir: str):
        if not os.path.isdir(root):
            raise ValueError(f"the adapter root {root!r} is not a folder")
        self.root = os.path.abspath(root)
        self.cache_dir = os.path.abspath(cache_dir)

    # ------------------------------------------------------------------------------------------ sources
    def adapter_dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise FileNotFoundError(f"no PEFT adapter {name!r}: {path} has no {CONFIG_NAME}")
        return path

    def router_dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(path, ROUTER_CONFIG)):
            raise FileNotFoundError(f"no router {name!r}: {path} has no {ROUTER_CONFIG} (save it with Router.save)")
        return path

    def has_adapter(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, CONFIG_NAME))

    # ------------------------------------------------------------------------------------------- builds
    def build(self, parsed) -> str:
        """The folder of the adapter vLLM should load for `parsed` (built now unless cached)."""
        if isinstance(parsed, PlainName):
            return self._concat("adapter", [(parsed.adapter, 1.0)], uniform=False)
        if isinstance(parsed, BlendName):
            return self._concat("blend", list(parsed.parts), uniform=False)
        if isinstance(parsed, RouteName):
            return self._routed(parsed)
        raise TypeError(f"expected a parsed LoRA name, got {type(parsed).__name__}")

    def _routed(self, parsed: RouteName) -> str:
        src = self.router_dir(parsed.router)
        router = load_router(src)
        if getattr(router, "stateful", False) or not getattr(router, "traceable", True):
            raise ValueError(f"router {parsed.router!r} is a {type(router).__name__}, whose decision at a token "
                             "depends on earlier tokens; inside vLLM only per-token routers (TokenRouter) are "
                             "supported")
        names = list(router.adapter_names)
        if parsed.top_k > len(names):
            raise ValueError(f"route {parsed.router!r}: top_k={parsed.top_k} exceeds its {len(names)} adapters")
        extra = {"router": _folder_digest(src), "top_k": parsed.top_k}
        return self._concat("route", [(n, 1.0) for n in names], uniform=True, extra=extra,
                            finish=lambda out, widths: self._write_routing(out, src, names, widths, parsed.top_k))

    def _concat(self, kind: str, parts: Sequence[tuple[str, float]], *, uniform: bool, extra=None,
                finish=None) -> str:
        dirs = [self.adapter_dir(name) for name, _ in parts]
        key_doc = {"format": FORMAT_VERSION, "kind": kind, "extra": extra,
                   "parts": [[name, repr(float(w)), _folder_digest(d)] for (name, w), d in zip(parts, dirs)]}
        key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
        target = os.path.join(self.cache_dir, f"{kind}-{key}")
        if os.path.isfile(os.path.join(target, CONFIG_NAME)):
            return target
        adapters = [load_adapter(name, d) for (name, _), d in zip(parts, dirs)]
        widths = segment_widths(adapters, uniform)
        config, tensors = concat_adapter(adapters, [w for _, w in parts], widths)
        return self._publish(target, config, tensors, lambda out: finish and finish(out, widths))

    def _publish(self, target: str, config: dict, tensors, finish) -> str:
        from safetensors.torch import save_file

        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".building-", dir=self.cache_dir)
        try:
            with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2)
            save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
            finish(tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # another process published the same key first: its folder is identical
                if not os.path.isfile(os.path.join(target, CONFIG_NAME)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _write_routing(out: str, router_src: str, names: list[str], widths: list[int], top_k: int) -> None:
        dst = os.path.join(out, ROUTER_SUBDIR)
        os.makedirs(dst)
        for name in (ROUTER_CONFIG, ROUTER_WEIGHTS):
            if os.path.isfile(os.path.join(router_src, name)):
                shutil.copyfile(os.path.join(router_src, name), os.path.join(dst, name))
        marker = {"format": FORMAT_VERSION, "adapter_names": names, "width": widths[0], "top_k": top_k}
        with open(os.path.join(out, ROUTING_MARKER), "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
