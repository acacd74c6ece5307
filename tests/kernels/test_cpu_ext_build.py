"""The CPU kernels are built with this environment's own ninja, whatever ninja the shell's PATH finds first,
and a build that cannot run says why."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertmesh.kernels import build_tools, cpu_ext

# The same loading path as the kernels' (`cpu_ext.load_extension`: this environment's ninja, our lock, the
# cache key), on a one-function source, so a fresh cache compiles in seconds rather than the kernels' minute.
_SOURCE = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""
_BUILD = """
import sys, warnings
from pathlib import Path
warnings.simplefilter("error", RuntimeWarning)  # a skipped build must fail here, not pass silently
from expertmesh.kernels.cpu_ext import load_extension
module = load_extension("expertmesh_build_probe", [Path(sys.argv[1])], [])
assert module is not None and module.answer() == 42
print(module.__file__)
"""


def _fake_ninja(directory: Path, marker: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "ninja"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    exe.chmod(0o755)
    return exe


def _build(path: str, cache: Path, source: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "EXPERTMESH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("EXPERTMESH_CPU_EXT", None)
    return subprocess.run([sys.executable, "-c", _BUILD, str(source)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_build_uses_the_environments_ninja_whatever_path_says(tmp_path):
    """A fresh cache (so it really compiles) and a PATH whose first ninja exits 1: the build still succeeds,
    never having run that ninja. A second process with another PATH reuses the build as it is."""
    if build_tools.environment_ninja_dir() is None:
        pytest.skip("no ninja installed next to this interpreter (the `ninja` wheel)")
    marker = tmp_path / "fake-ninja-ran"
    _fake_ninja(tmp_path / "bin", marker)
    cache = tmp_path / "cache"
    source = tmp_path / "src" / "probe.cpp"
    source.parent.mkdir()
    source.write_text(_SOURCE)
    first = _build(os.pathsep.join([str(tmp_path / "bin"), os.environ.get("PATH", "")]), cache, source)
    assert first.returncode == 0, first.stderr
    assert not marker.exists(), f"the PATH's ninja ran: {marker.read_text()}"
    built = Path(first.stdout.strip().splitlines()[-1])
    objects = {p: p.stat().st_mtime_ns for p in built.parent.glob("*.o")} | {built: built.stat().st_mtime_ns}
    assert len(objects) == 2

    time.sleep(0.01)
    second = _build(os.environ.get("PATH", ""), cache, source)  # the shell's own PATH (a system ninja, if any)
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == built  # same cache key
    assert {p: p.stat().st_mtime_ns for p in objects} == objects, "a different PATH recompiled the kernels"


def test_search_path_puts_the_environments_ninja_first(tmp_path, monkeypatch):
    env_bin = tmp_path / "env-bin"
    env_bin.mkdir()
    (env_bin / "ninja").write_text("#!/bin/sh\n")
    (env_bin / "ninja").chmod(0o755)
    monkeypatch.setattr(build_tools, "_candidate_dirs", lambda: [tmp_path / "nothing", env_bin])
    assert build_tools.build_search_path(f"/elsewhere{os.pathsep}{env_bin}") == os.pathsep.join(
        [str(env_bin), "/elsewhere"])

    monkeypatch.setenv("PATH", "/elsewhere")
    with build_tools.build_path() as path:
        assert os.environ["PATH"] == path == os.pathsep.join([str(env_bin), "/elsewhere"])
    assert os.environ["PATH"] == "/elsewhere"


def test_without_an_environment_ninja_the_path_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(build_tools, "_candidate_dirs", lambda: [tmp_path])
    assert build_tools.build_search_path("/a:/b") == "/a:/b"


def test_the_reason_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(build_tools, "_candidate_dirs", lambda: [tmp_path / "venv-bin"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no ninja found" in build_tools.missing_tool(str(empty), "c++")
    assert "venv-bin" in build_tools.missing_tool(str(empty), "c++")

    broken = _fake_ninja(tmp_path / "broken", tmp_path / "marker")
    reason = build_tools.missing_tool(str(broken.parent), "c++")
    assert str(broken) in reason and "exit status 1" in reason

    works = tmp_path / "works"
    works.mkdir()
    (works / "ninja").write_text("#!/bin/sh\necho 1.13.2\n")
    (works / "ninja").chmod(0o755)
    reason = build_tools.missing_tool(str(works), "no-such-compiler-xyz")
    assert "no C++ compiler" in reason and "no-such-compiler-xyz" in reason


def test_an_unbuildable_extension_warns_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(build_tools, "_candidate_dirs", lambda: [tmp_path])
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja anywhere
    monkeypatch.delenv(cpu_ext.DISABLE_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no ninja found"):
        assert cpu_ext.small_m_kernels.__wrapped__() is None


def test_a_failed_compile_is_summarised_by_its_error_lines():
    output = ("Error building extension 'expertmesh_small_m': [1/3] c++ -MMD -O3 -c small_m.cpp\n"
              "FAILED: small_m.o\nsmall_m.cpp:3:10: fatal error: nope.h: No such file or directory\n"
              "compilation terminated.\nninja: build stopped: subcommand failed.\n")
    reason = build_tools.build_failure_reason(RuntimeError(output))
    assert reason == "RuntimeError: small_m.cpp:3:10: fatal error: nope.h: No such file or directory"


def test_a_lock_left_by_a_dead_build_is_removed_with_a_warning(tmp_path):
    """torch's waiters wait for its lock file with no limit. One found while holding our lock is a dead
    builder's, however fresh: removed at once."""
    lock = tmp_path / "lock"
    lock.touch()
    with pytest.warns(RuntimeWarning, match="removing the CPU kernels' build lock"):
        with cpu_ext.build_lock(tmp_path):
            assert not lock.exists()


_HOLDER = """
import sys, time
from pathlib import Path
from expertmesh.kernels import cpu_ext
build_dir = Path(sys.argv[1])
with cpu_ext.build_lock(build_dir):
    (build_dir / "lock").touch()  # as torch's builder does
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    (build_dir / "lock").unlink()
"""


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path):
    """Another process building holds our lock: wait for it, and do not take its torch lock for a dead one."""
    import subprocess
    import sys
    import warnings

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), "1.0"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with cpu_ext.build_lock(tmp_path):
                waited = time.monotonic() - start
        assert holder.wait(timeout=30) == 0  # it removed its own lock: nobody else did
        assert waited >= 0.5
    finally:
        holder.kill()


def test_a_builder_killed_midway_releases_our_lock(tmp_path):
    """SIGKILL leaves torch's lock file behind but not ours: the next process goes on at once."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), "600"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.kill()
        holder.wait(timeout=30)
        assert (tmp_path / "lock").exists()
        with pytest.warns(RuntimeWarning, match="removing the CPU kernels' build lock"):
            with cpu_ext.build_lock(tmp_path):
                pass
        assert not (tmp_path / "lock").exists()
    finally:
        holder.kill()


def test_two_checkouts_of_the_same_sources_build_apart(tmp_path, monkeypatch):
    """torch's build.ninja names the sources by absolute path: two checkouts sharing one build directory
    rebuilt over each other (and a build killed midway left its lock to every later process)."""
    import shutil

    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / "cache"))
    here = cpu_ext._build_dir(cpu_ext._SOURCES, cpu_ext._HEADERS)
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_ext._CSRC, copy)
    assert cpu_ext._build_dir([copy / p.name for p in cpu_ext._SOURCES],
                              [copy / p.name for p in cpu_ext._HEADERS]) != here
