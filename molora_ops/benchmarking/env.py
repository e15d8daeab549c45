"""The environment stamped on every result line: device, driver, versions, git sha and a timestamp."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from functools import lru_cache

import torch


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it, with family/model added when the name has no model number
    (a VM may report just "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's entries
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields and not re.search(r"\d{3,}", name):
        name = f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def _driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi: the runtime version is still worth recording
        return f"cuda runtime {torch.version.cuda}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def git_sha() -> str | None:
    """The checkout's HEAD, with '-dirty' when tracked files differ from it; None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "molora_ops", "kernels", "csrc"], cwd=here, timeout=10
        ).returncode
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


@lru_cache(maxsize=None)
def _static_environment(device_type: str, index: int | None) -> tuple:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _driver() if device.type == "cuda" else None,
        "cuda_runtime": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "molora_ops": _version("molora_ops"),
        "git_sha": git_sha(),
        "hostname": platform.node(),
    }
    return tuple(env.items())


def environment(device: torch.device) -> dict:
    """Everything a reader needs to rerun or discount a number, plus the time it was taken (UTC)."""
    env = dict(_static_environment(device.type, device.index))
    env["torch_threads"] = torch.get_num_threads()
    env["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    try:
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)  # a busy shared machine makes CPU numbers noisy
    except OSError:
        env["loadavg_1m"] = None
    return env


def device_slug(device: torch.device) -> str:
    """A short file-name-safe tag for results files: 'cpu-amd-epyc', 'cuda-nvidia-h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model().split("(")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}" if slug else device.type
