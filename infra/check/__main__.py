"""`python -m infra.check` (`make infra-check`): every offline check of infra/ and terraform/, one line each;
exit status 1 when any fails. A tool that is not installed is skipped, and the line says so."""

from __future__ import annotations

import sys
from pathlib import Path

from infra.check import hcl, manifests, tools

ROOT = Path(__file__).resolve().parents[2]


def results() -> list[tools.ToolResult]:
    out = [tools.terraform_fmt()]
    files, errors = hcl.check_all(expected_gpu_groups=manifests.gpu_node_pools())
    out.append(tools.ToolResult("terraform structure (python-hcl2)", not errors, None,
                                f"{files} .tf files parsed, rules hold" if not errors else "\n".join(errors)))
    count, errors = manifests.check_all()
    out.append(tools.ToolResult("manifests (KubeRay CRDs, Kubernetes schemas)", not errors, None,
                                f"{count} objects valid" if not errors else "\n".join(errors)))
    out.append(tools.yamllint(sorted((ROOT / "infra").rglob("*.yaml"))))
    out.append(tools.checkov(ROOT / "terraform", "terraform"))
    out.append(tools.checkov(ROOT / "infra" / "k8s", "kubernetes"))
    out.append(tools.checkov(ROOT / "infra" / "docker", "dockerfile"))
    return out


def main() -> int:
    failed = 0
    for r in results():
        status = "SKIP" if r.skipped else ("ok" if r.ok else "FAIL")
        print(f"{status:4}  {r.name}: {r.skipped or r.detail}")
        failed += not r.ok
    print(f"infra-check: {'all passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
