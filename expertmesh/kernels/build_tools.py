"""The tools the CPU kernels' build runs: the environment's own ninja first, and why a build cannot run.

torch's `cpp_extension.load` runs whatever `ninja` comes first on PATH. A shell with the venv activated and
one without (`make`, `.venv/bin/python`) would then use different ninjas, and a ninja of another version
rebuilds the whole cache directory (its log format differs); a machine with no system ninja would not build
at all although the `ninja` wheel is installed. So the build puts the directory of the environment's own
ninja (next to `sys.executable`, where the wheel installs it) at the front of PATH, for the build only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _candidate_dirs() -> list[Path]:
    """Where this environment's ninja may be, first choice first (the interpreter's path is not resolved:
    a venv's python is a symlink to the base interpreter, outside the venv)."""
    dirs = [Path(sys.executable).parent]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        dirs.append(Path(scripts))
    try:
        import ninja  # the wheel's package knows where it put the binary

        dirs.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def environment_ninja_dir() -> Path | None:
    """The directory of this Python environment's own ninja, or None (then only PATH can provide one)."""
    for d in _candidate_dirs():
        exe = d / "ninja"
        if exe.is_file() and os.access(exe, os.X_OK):
            return d
    return None


def build_search_path(path: str | None = None) -> str:
    """`path` (default: $PATH) with the environment's ninja directory first."""
    path = os.environ.get("PATH", "") if path is None else path
    first = environment_ninja_dir()
    if first is None:
        return path
    rest = [p for p in path.split(os.pathsep) if p and Path(p) != first]
    return os.pathsep.join([str(first), *rest])


@contextmanager
def build_path() -> Iterator[str]:
    """$PATH as `build_search_path()` for the duration of a build, then restored."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = build_search_path(before or "")
    try:
        yield os.environ["PATH"]
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def missing_tool(path: str, compiler: str) -> str | None:
    """Why a build on this search path cannot run (no working ninja, no compiler), or None."""
    ninja = shutil.which("ninja", path=path)
    if ninja is None:
        looked = ", ".join(str(d) for d in _candidate_dirs())
        return f"no ninja found (looked in {looked} and on PATH; `pip install ninja` into this environment)"
    try:
        subprocess.run([ninja, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{ninja} does not run (`ninja --version`: {_short(e)})"
    program = (shlex.split(compiler) or [""])[0]  # CXX may carry a wrapper or flags ("ccache g++")
    if not program or shutil.which(program, path=path) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++, or set CXX)"
    return None


def _short(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"exit status {e.returncode}"
    return f"{type(e).__name__}: {e}"


def build_failure_reason(error: BaseException, max_lines: int = 3, width: int = 300) -> str:
    """What a failed build's output says went wrong (the compiler's `error:` lines), not all of its output."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    picked = [ln for ln in lines if "error:" in ln.lower()][:max_lines] or lines[:1]
    shortened = [ln if len(ln) <= width else ln[: width - 3] + "..." for ln in picked]
    return f"{type(error).__name__}: " + " | ".join(shortened)
