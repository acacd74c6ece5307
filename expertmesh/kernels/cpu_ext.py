"""Builds and loads the C++ CPU kernels of `csrc/` on first use.

The kernels are compiled for this machine (`-march=native`) the first time they are needed and cached
under `$EXPERTMESH_CACHE` (default `~/.cache/expertmesh`), keyed by the source (its text and its directory),
torch version and CPU flags (not by the shell's PATH: the build always prefers this environment's own ninja,
see `build_tools`).
Where they cannot be built (no compiler, no ninja, `EXPERTMESH_CPU_EXT=0`) the torch paths run instead, with
one warning saying why.

torch's builder takes a lock file in the build directory and every other process waits for that file to go,
with no limit. A build that is killed (a test's timeout, an OOM kill, Ctrl-C) leaves the file behind, and every
later process on the machine would wait forever: a server never became ready, a CI run hung. So every load
runs under a lock of our own (`build_lock`): an `flock` on a file beside torch's, which the kernel releases when
its holder exits, however it exits. Whoever holds it is the only one of us building there, so a torch lock it
finds was left by a builder that died, and is removed, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from expertmesh.kernels.build_tools import build_failure_reason, build_path, missing_tool

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in (
    "small_m.cpp", "decode_ops.cpp", "lora.cpp", "decode_stack.cpp", "gqa_decode.cpp")]
_HEADERS = [_CSRC / name for name in ("rows_dot.h", "lora_rows.h", "ops.h", "q8_rows.h", "mla_context.h",
                                      "flash_merge.h", "tokens_in_lanes.h")]
DISABLE_ENV = "EXPERTMESH_CPU_EXT"
# -fno-math-errno lets the compiler vectorise exp (softmax); reductions are reassociated only inside
# explicit `omp simd` loops.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build_dir(sources: list[Path], headers: list[Path]) -> Path:
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in sources + headers)
        + " ".join(_CFLAGS).encode()
        + torch.__version__.encode()
        + _cpu_flags().encode()
        # build.ninja names the sources by path: two checkouts would rebuild in turn
        + "".join(sorted({str(p.parent.resolve()) for p in sources})).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))
    path = root / "cpu_ext" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Held while this process loads (and maybe builds) the kernels in `build_dir`; waits while another process
    holds it. Inside it, torch's own lock file can only be a dead builder's: it is removed."""
    with open(build_dir / "expertmesh.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the kernel when this process ends, whatever ends it
        try:
            torch_lock = build_dir / "lock"
            if torch_lock.exists():
                warnings.warn(f"expertmesh: removing the CPU kernels' build lock {torch_lock}, left by a build that "
                              "did not finish; building again", RuntimeWarning, stacklevel=3)
                torch_lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def load_extension(name: str, sources: list[Path], headers: list[Path]) -> ModuleType | None:
    """Builds (once per source text) and loads the extension `name` from `sources`, with this environment's
    ninja and under `build_lock`; None, with a warning saying why, where it cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import get_cxx_compiler, load

        with build_path() as path:  # this environment's ninja, whichever shell started us
            reason = missing_tool(path, get_cxx_compiler())
            if reason is None:
                build_dir = _build_dir(sources, headers)
                with build_lock(build_dir):
                    return load(
                        name=name,
                        sources=[str(p) for p in sources],
                        extra_cflags=_CFLAGS + sorted({f"-I{p.parent}" for p in sources}),
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(build_dir),
                        verbose=False,
                    )
    except Exception as e:  # a failed build must not take serving down
        reason = build_failure_reason(e)
    warnings.warn(f"expertmesh: CPU kernels could not be built ({reason}); using torch paths",
                  RuntimeWarning, stacklevel=3)
    return None


@functools.cache
def small_m_kernels() -> ModuleType | None:
    """The compiled module of `csrc/`, or None where it cannot be had."""
    return load_extension("expertmesh_small_m", _SOURCES, _HEADERS)
