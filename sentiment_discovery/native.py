"""The fused mLSTM's hand-written CPU step kernels (``csrc/mlstm_cpu.cpp``), compiled once per machine.

The first time a process needs them, the C++ source is compiled with the system compiler (``$CXX``,
else ``c++``) against the installed torch, for this CPU (``-march=native``), and the library is kept
in ``~/.cache/sentiment_discovery/kernels`` (``$SENTIMENT_DISCOVERY_CACHE`` moves it) under a hash
of the source, torch's version, the flags and the CPU's feature flags: about 12 s once, then a
library load. Where there is no working compiler, ``ops()`` is None, the layer does the same math
with PyTorch calls (slower: bench/RESULTS.md), and the reason is said once.
``SENTIMENT_DISCOVERY_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .matmul import cache_root, cpu_flags, say_once

NATIVE_ENV = "SENTIMENT_DISCOVERY_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "mlstm_cpu.cpp"
# -fno-trapping-math -fno-math-errno let the compiler vectorize the branch-free exp and clamps.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-std=c++20",
         "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 600


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _compile_command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    return [
        compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()), str(SOURCE), "-o", str(output),
        *(f"-L{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch", *(f"-Wl,-rpath,{p}" for p in libs),
    ]


def build(cache: Path | None = None) -> Path:
    """Compile the kernels (or find them already compiled); the library's path. Raises on failure."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found; set CXX)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, torch.__version__.encode(), " ".join(FLAGS).encode(), cpu_flags().encode(),
                    compiler.encode()])
    ).hexdigest()[:16]
    cache = cache or _cache_dir()
    library = cache / f"mlstm_cpu-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a name of our own, then rename: processes compiling at once (DDP) never see half a file.
    fd, tmp = tempfile.mkstemp(prefix=library.stem + ".", suffix=".so.tmp", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(compiler, Path(tmp)), capture_output=True, text=True,
                              timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, library)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return library


@functools.cache
def ops():
    """``torch.ops.sentiment_discovery`` with the step kernels loaded, or None where they cannot be."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    try:
        torch.ops.load_library(str(build()))
    except Exception as error:  # no compiler, a failed build or load: the PyTorch path does the same math
        say_once(f"the fused mLSTM's C++ step kernels are not available ({error}); "
                 "running its element-wise work as PyTorch calls (slower)")
        return None
    return torch.ops.sentiment_discovery
