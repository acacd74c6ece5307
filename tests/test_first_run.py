"""What a first run from a fresh clone relies on: `make` runs everything with the venv's bin first on PATH
(so the kernels' build sees the same tools as an activated shell), and installing prints no deprecation
banner for the package's own metadata."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_make_targets_run_with_the_venvs_bin_first_on_path():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    out = subprocess.run(["make", "--no-print-directory", "--eval", '_print_path: ; @echo "$$PATH"', "_print_path"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    first, *rest = out.stdout.strip().split(os.pathsep)
    assert Path(first) == ROOT / ".venv" / "bin"
    assert rest == env["PATH"].split(os.pathsep)


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    """A `license = {text = ...}` table makes setuptools >= 77 print a deprecation banner on every install;
    the SPDX string needs setuptools >= 77 (PEP 639)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    (floor,) = [int(m.group(1)) for req in pyproject["build-system"]["requires"]
                if (m := re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req))]
    assert floor >= 77
