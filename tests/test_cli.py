"""The command line: --version everywhere, and the demo's early check of its optional dependencies."""

import os
import subprocess
import sys
import time

import pytest
import torch

import molora_ops
from molora_ops.cli import main
from molora_ops.commands.demo import main as demo_main

EXPECTED = f"molora_ops {molora_ops.__version__}"


@pytest.mark.parametrize("entry", [main, demo_main], ids=["molora", "molora-demo"])
def test_version_in_process(capsys, entry):
    with pytest.raises(SystemExit) as exc:
        entry(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == EXPECTED


def test_version_from_the_shell():
    out = subprocess.run([sys.executable, "-m", "molora_ops", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == EXPECTED, out.stderr
    script = os.path.join(os.path.dirname(sys.executable), "molora")  # the console script, when installed here
    if os.path.exists(script):
        out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == EXPECTED, out.stderr


def test_demo_without_matplotlib_stops_at_once(tmp_path, monkeypatch):
    from molora_ops.demo import pipeline

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"matplotlib \(for the routing heat map: pip install 'molora-ops\[plot\]'\)"
                                         r".*pass --no-plot"):
        main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert time.perf_counter() - start < 30 and not (tmp_path / "out").exists()

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(pipeline, "build_builtin", started)  # --no-plot gets past the check and starts work
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Started):
            main(["demo", "--quick", "--no-plot", "--device", "cpu", "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)  # the demo picks its own thread count; leave the session's alone
