"""``molora info``: versions and which backends can run here, with the reason when one cannot."""

from __future__ import annotations

import json
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for name in ("triton", "transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # a missing optional dependency is information, not an error
            env[name] = f"not importable ({type(exc).__name__})"
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env


def run(args) -> int:
    import molora_ops

    report = {"molora_ops": molora_ops.__version__, "environment": environment(), "backends": molora_ops.backends()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"molora_ops {report['molora_ops']}")
    for key, value in report["environment"].items():
        print(f"  {key:<13} {value}")
    print("backends:")
    for name, status in report["backends"].items():
        mark = "yes" if status["available"] else "no "
        built = "compiled" if status["compiled"] else "not compiled"
        print(f"  {name:<7} available: {mark}  ({built}) - {status['reason']}")
    return 0
