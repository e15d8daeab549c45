"""Build script for the C++ extensions; all package metadata lives in pyproject.toml.

`pip install --no-build-isolation -e .` (or a wheel build) compiles
  * csrc/cpu/ into molora_ops/_cpu*.so with the C++ compiler setuptools finds (the CPU runtime's fused kernels,
    molora_ops/impl/cpu_fused.py; a few seconds), and
  * csrc/*.cu into molora_ops/_C*.so with CMake and Ninja when nvcc is found (the cuda backend).
It never touches the network. Environment:

    MOLORA_SKIP_CPU_BUILD=1    skip the CPU extension (the CPU runtime then uses its pure-PyTorch strategies)
    MOLORA_SKIP_CUDA_BUILD=1   skip the CUDA extension (the cuda backend reports why)
    MOLORA_CUDA_ARCHS          ";"- or ","-separated SM versions, default "80;86;89;90". Each gets SASS and
                               the highest also gets PTX (so newer GPUs JIT it). CI may use e.g. "80" alone.
    CUDACXX / CUDA_HOME        which nvcc to use (default: nvcc on PATH, then /usr/local/cuda/bin/nvcc)
    MAX_JOBS                   parallel compile jobs (default: the number of CPUs, at most 8)
    MOLORA_CMAKE_ARGS          extra arguments for the CMake configure step

The extension links against libc10 and libtorch_cpu only and includes no c10/cuda or ATen/cuda header, so it
builds against the CPU torch wheel too (CI compiles it on every run without a GPU). A failing CUDA build fails
the install: set MOLORA_SKIP_CUDA_BUILD=1 to install without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "molora_ops._C"
CPU_EXT_NAME = "molora_ops._cpu"
DEFAULT_ARCHS = "80;86;89;90"


def _log(msg: str) -> None:
    print(f"molora_ops setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_archs() -> list[str]:
    """MOLORA_CUDA_ARCHS -> CMAKE_CUDA_ARCHITECTURES entries: SASS for each, plus PTX for the highest."""
    raw = os.environ.get("MOLORA_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for tok in raw.replace(",", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not tok:
            continue
        if not tok.rstrip("af").isdigit():
            raise ValueError(f"MOLORA_CUDA_ARCHS: cannot read {tok!r} in {raw!r} (want e.g. '80;86;89;90')")
        archs.append(tok)
    if not archs:
        raise ValueError(f"MOLORA_CUDA_ARCHS is empty ({raw!r})")
    archs = sorted(set(archs), key=lambda a: int(a.rstrip("af")))
    return [f"{a}-real" for a in archs[:-1]] + [archs[-1]]


def skip_reason() -> str | None:
    if os.environ.get("MOLORA_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return "MOLORA_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc not found (set CUDACXX or CUDA_HOME)"
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class TorchCppExtension(Extension):
    """A C++ library against torch's headers and libraries (no Python API: it registers torch ops, loaded with
    torch.ops.load_library); torch's paths and ABI are filled in at build time, when torch is importable."""

    def __init__(self, name: str, sources: list[str]):
        # optional: a machine without a working C++ compiler still installs (the CPU runtime then reports why its
        # kernels are missing and uses the pure-PyTorch strategies); CI requires the library (cpu_fused)
        super().__init__(name, sources=sources, language="c++", optional=True)

    def configure(self) -> None:
        import torch
        import torch.utils.cpp_extension as cpp_ext

        torch_lib = str(Path(torch.__file__).resolve().parent / "lib")
        self.include_dirs += cpp_ext.include_paths()
        self.library_dirs.append(torch_lib)
        self.libraries += ["c10", "torch_cpu"]
        self.extra_compile_args += ["-O3", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        if sys.platform.startswith("linux"):
            # torch's OpenMP runtime (the torch wheel ships its libgomp in torch/lib, found through the rpath), so
            # at::parallel_for shares torch's intra-op threads instead of starting a second pool
            self.extra_compile_args.append("-fopenmp")
            self.extra_link_args += ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
        elif sys.platform == "darwin":
            self.extra_link_args.append(f"-Wl,-rpath,{torch_lib}")  # no OpenMP flag: at::parallel_for runs serially


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with Ninja; the library lands where setuptools expects the extension
    (inside the source tree for editable installs)."""

    def build_extension(self, ext: Extension) -> None:
        if isinstance(ext, TorchCppExtension):
            _log(f"building the CPU extension {ext.name}")
            ext.configure()
            return super().build_extension(ext)
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch
        import torch.utils.cpp_extension as cpp_ext

        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build directory under build/ (git-ignored) keeps rebuilds incremental, also for editable
        # installs, whose build_temp is a fresh temporary directory each time.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
        build_dir = ROOT / "build" / f"molora_cuda-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or _module_bin("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = shutil.which("ninja") or _module_bin("ninja", "BIN_DIR", "ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("building the CUDA extension needs cmake and ninja (pip install cmake ninja), "
                               "or set MOLORA_SKIP_CUDA_BUILD=1")
        archs = cuda_archs()
        torch_lib = Path(torch.__file__).resolve().parent / "lib"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}",
            f"-DMOLORA_TORCH_INCLUDE_DIRS={';'.join(cpp_ext.include_paths())}",
            f"-DMOLORA_TORCH_LIBRARY_DIR={torch_lib}",
            f"-DMOLORA_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMOLORA_OUTPUT={output}",
            "-DCMAKE_BUILD_TYPE=Release",
        ] + os.environ.get("MOLORA_CMAKE_ARGS", "").split()
        jobs = os.environ.get("MAX_JOBS") or str(min(os.cpu_count() or 1, 8))
        _log(f"building the CUDA extension for {archs} with {jobs} jobs into {output}")
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        if not output.is_file():
            raise RuntimeError(f"CMake finished but {output} was not produced")


def _module_bin(module: str, attr: str, exe: str) -> str | None:
    try:
        path = Path(getattr(__import__(module), attr)) / exe
    except Exception:
        return None
    return str(path) if path.is_file() else None


ext_modules = []
if os.environ.get("MOLORA_SKIP_CPU_BUILD", "") not in ("", "0"):
    _log("not building the CPU extension: MOLORA_SKIP_CPU_BUILD is set")
else:
    ext_modules.append(TorchCppExtension(CPU_EXT_NAME, ["csrc/cpu/routed_lora_cpu.cpp"]))
reason = skip_reason()
if reason:
    _log(f"not building the CUDA extension: {reason}")
else:
    ext_modules.append(CMakeExtension(EXT_NAME))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
