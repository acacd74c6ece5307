"""The external checkers: `terraform fmt`, yamllint and checkov. Each is skipped, saying so, where it is not
installed; `make infra-check` installs checkov in its own venv (it pins an hcl2 fork of its own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKOV_VENV = Path(os.environ.get("EXPERTMESH_CHECKOV_VENV", ROOT / ".venv-checkov"))
YAMLLINT_CONFIG = ROOT / "infra" / ".yamllint.yaml"


@dataclass(frozen=True)
class ToolResult:
    name: str
    ok: bool
    skipped: str | None  # why it did not run; None when it ran
    detail: str  # what it found, or a summary


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def terraform_fmt(path: Path = ROOT / "terraform") -> ToolResult:
    exe = shutil.which("terraform")
    if exe is None:
        return ToolResult("terraform fmt", True, "the terraform binary is not installed", "")
    done = _run([exe, "fmt", "-check", "-recursive", "-list=true", str(path)], 120)
    unformatted = done.stdout.strip()
    ok = done.returncode == 0
    return ToolResult("terraform fmt", ok, None,
                      "all formatted" if ok else f"not formatted (run `terraform fmt -recursive`):\n"
                                                 f"{unformatted or done.stderr.strip()}")


def yamllint(paths: list[Path]) -> ToolResult:
    try:
        from yamllint import linter
        from yamllint.config import YamlLintConfig
    except ImportError:
        return ToolResult("yamllint", True, "yamllint is not installed", "")
    config = YamlLintConfig(file=str(YAMLLINT_CONFIG))
    problems = []
    for path in (p.resolve() for p in paths):
        if path.is_relative_to(YAMLLINT_CONFIG.parent) and config.is_file_ignored(
                str(path.relative_to(YAMLLINT_CONFIG.parent))):
            continue
        for p in linter.run(path.read_text(), config, str(path)):
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            problems.append(f"{shown}:{p.line}:{p.column}: [{p.level}] {p.message}")
    return ToolResult("yamllint", not problems, None,
                      f"{len(paths)} files clean" if not problems else "\n".join(problems))


def checkov(directory: Path, framework: str, venv: Path = CHECKOV_VENV) -> ToolResult:
    """checkov on `directory` (frameworks: terraform, kubernetes, dockerfile), offline. Suppressions live inline with
    their reasons (`# checkov:skip=ID: reason`; `checkov.io/skip<N>` annotations in manifests)."""
    exe = venv / "bin" / "checkov"
    name = f"checkov ({framework})"
    if not exe.exists():
        return ToolResult(name, True, f"checkov is not installed at {exe} (make infra-check installs it)", "")
    done = _run([str(exe), "-d", str(directory), "--framework", framework, "--skip-download", "--quiet",
                 "--compact", "-o", "json", "--skip-path", "crds"], 600)
    try:
        reports = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        return ToolResult(name, False, None, f"checkov failed (exit {done.returncode}): {done.stderr[-2000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    failed, passed, skipped = [], 0, 0
    for report in reports:
        summary = report.get("summary", {})
        passed += summary.get("passed", 0)
        skipped += summary.get("skipped", 0)
        for check in report.get("results", {}).get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['check_name']}: {check['file_path']} {check['resource']}")
    summary = f"passed {passed}, suppressed inline with a reason {skipped}, failed {len(failed)}"
    return ToolResult(name, not failed and done.returncode in (0, 1), None,
                      summary + ("".join(f"\n  {f}" for f in failed)))
