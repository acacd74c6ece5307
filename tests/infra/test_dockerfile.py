"""infra/docker/Dockerfile, read as text (no Docker here): pinned bases for both variants, torch 2.13.0 from
the variant's index, a non-root `ray` user, a health check on /health, `expertmesh serve` by default; its
.dockerignore keeps environments, weights and tests out of the build context but not the sources the
Dockerfile copies; `make image` builds it or says why it cannot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "infra" / "docker" / "Dockerfile.dockerignore"
VARIANTS = ("cpu", "cuda")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def stages(parsed: list[tuple[str, str]]) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults (before the first FROM) and the stages, each starting with its FROM."""
    global_args, result = {}, []
    for keyword, args in parsed:
        if keyword == "FROM":
            result.append([(keyword, args)])
        elif result:
            result[-1].append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return global_args, result


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def stage_args(stage: list[tuple[str, str]], global_args: dict[str, str], variant: str) -> dict[str, str]:
    values = {**global_args, "VARIANT": variant}
    for keyword, args in stage:
        if keyword == "ARG":
            name, eq, default = args.partition("=")
            if eq:
                values[name] = default
    return values


def pinned(image: str) -> bool:
    """`name:tag` with an exact x.y.z version in the tag (a digest is fine too); never `latest` or bare."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all (the colon was a registry port)
        return False
    return tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag) is not None


@pytest.fixture(scope="module")
def parsed():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(parsed):
    return stages(parsed)[1][-1]


def test_instruction_parser_joins_continuations_and_skips_comments():
    text = "# c\nARG A=1\nFROM x:1.2.3 AS b\nRUN a \\\n    # inside\n    && b\n"
    assert instructions(text) == [("ARG", "A=1"), ("FROM", "x:1.2.3 AS b"), ("RUN", "a && b")]


@pytest.mark.parametrize("image, ok", [("python:3.11.14-slim-bookworm", True), ("python:latest", False),
                                       ("python", False), ("python:3.11-slim", False),
                                       ("registry:5000/team/img", False), ("img@sha256:" + "a" * 64, True)])
def test_pin_rule(image, ok):
    assert pinned(image) is ok


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_from_pins_an_exact_tag_or_names_a_stage(parsed, variant):
    global_args, all_stages = stages(parsed)
    assert global_args.get("VARIANT") in VARIANTS
    names = set()
    for stage in all_stages:
        ref, _, alias = expand(stage[0][1], {**global_args, "VARIANT": variant}).partition(" AS ")
        ref = ref.split()[-1]  # after any --platform flag
        assert ref in names or pinned(ref), f"FROM {ref} (VARIANT={variant}) is neither a stage nor pinned"
        names.add(alias.strip())
    for keyword, args in parsed:  # images mounted straight into a RUN must be pinned or stages too
        for source in re.findall(r"--mount=\S*\bfrom=([^,\s]+)", args) if keyword == "RUN" else []:
            assert source in names or pinned(source), source
    assert {"base-cpu", "base-cuda"} <= names


def test_cpu_base_is_python_311_slim_bookworm_and_cuda_base_is_nvidia(parsed):
    froms = [args for keyword, args in parsed if keyword == "FROM"]
    cpu = next(f for f in froms if f.endswith("AS base-cpu"))
    cuda = next(f for f in froms if f.endswith("AS base-cuda"))
    assert re.match(r"python:3\.11\.\d+-slim-bookworm ", cpu)
    assert cuda.startswith("nvidia/cuda:12.8.")


@pytest.mark.parametrize("variant, index", [("cuda", "https://download.pytorch.org/whl/cu128"),
                                            ("cpu", "https://download.pytorch.org/whl/cpu")])
def test_torch_2_13_0_from_the_variants_index(parsed, variant, index):
    global_args, all_stages = stages(parsed)
    build = next(s for s in all_stages if s[0][1].endswith(" AS build"))
    values = stage_args(build, global_args, variant)
    runs = [expand(args, values) for keyword, args in build if keyword == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    assert "torch==2.13.0" in torch_run
    assert f"{variant}) index=\"{index}\"" in torch_run
    assert '--index-url "${index}"' in torch_run
    project_run = next(i for i, r in enumerate(runs) if 'pip install --no-cache-dir ".[hub]"' in r)
    assert runs.index(torch_run) < project_run  # torch first, or pip would pull PyPI's default build


def test_runtime_runs_as_ray_uid_10001_in_its_home(final_stage):
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert users[-1] == "ray"
    runs = " ".join(args for keyword, args in final_stage if keyword == "RUN")
    assert re.search(r"useradd [^&;]*--uid 10001 [^&;]*--home-dir /home/ray [^&;]* ray\b", runs)
    assert [args for keyword, args in final_stage if keyword == "WORKDIR"][-1] == "/home/ray"


def test_healthcheck_calls_health_with_urllib_on_the_configured_port(final_stage):
    checks = [args for keyword, args in final_stage if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "urllib.request" in checks[0] and "/health" in checks[0]
    assert "${EXPERTMESH_PORT:-8000}" in checks[0]
    assert "curl" not in checks[0]


def test_default_command_serves_the_builtin_model_on_all_interfaces(final_stage):
    cmd = json.loads([args for keyword, args in final_stage if keyword == "CMD"][-1])
    line = " ".join(cmd)
    assert "expertmesh serve" in line and "--host 0.0.0.0" in line
    assert "--model" not in line
    assert '--port "${EXPERTMESH_PORT:-8000}"' in line


def test_ports_and_environment(final_stage):
    exposed = set(" ".join(args for keyword, args in final_stage if keyword == "EXPOSE").split())
    assert exposed == {"8000", "8265", "6379", "8080"}
    env = " ".join(args for keyword, args in final_stage if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env  # Ray must advertise the pod's IP
    assert any(keyword == "LABEL" and "org.opencontainers.image.title" in args for keyword, args in final_stage)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, closely enough: the last pattern matching the path or one of its parent directories
    decides; `!` re-includes; `*` stays within a path segment, `**` spans any number of them."""
    result = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("path", [".venv/bin/python", ".venv-checkov/bin/python", "models/tiny/config.json",
                                  ".git/HEAD", "tests/conftest.py", "bench/results.json",
                                  "expertmesh/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md"])
def test_dockerignore_keeps_out(ignore_patterns, path):
    assert ignored(path, ignore_patterns), path


def test_dockerignore_keeps_what_the_dockerfile_copies(parsed, ignore_patterns):
    sources = []
    for keyword, args in parsed:
        if keyword == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert {"pyproject.toml", "README.md", "expertmesh"} <= set(sources)
    for path in ["pyproject.toml", "README.md", "expertmesh/cli.py", "expertmesh/kernels/csrc/small_m.cpp",
                 "expertmesh/protos/expert_dispatch.proto"]:
        assert not ignored(path, ignore_patterns), path


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_image_builds_the_variant_or_explains(tmp_path):
    dry = subprocess.run(["make", "-n", "image", "VARIANT=cpu", "IMAGE=em:test"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert "docker build -f infra/docker/Dockerfile --build-arg VARIANT=cpu -t em:test ." in dry.stdout
    no_docker = tmp_path / "bin"
    no_docker.mkdir()
    env = {**os.environ, "PATH": str(no_docker) + ":/usr/bin:/bin"}
    if shutil.which("docker", path=env["PATH"]):
        pytest.skip("docker is installed in /usr/bin or /bin")
    run = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode != 0
    assert "docker not found" in run.stderr
