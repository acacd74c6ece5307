"""`python -m infra.check` (`make infra-check`): every offline check of infra/ and terraform/, one line each;
exit status 1 when any fails. A tool that is not installed is skipped, and the line says so."""

from __future__ import annotations

import sys
from pathlib import Path

from infra.check import cluster_policy, hcl, manifests, ray_auth, tools

ROOT = Path(__file__).resolve().parents[2]


def results() -> list[tools.ToolResult]:
    out = [tools.terraform_fmt()]
    files, errors = hcl.check_all(expected_gpu_groups=manifests.gpu_node_pools())
    out.append(tools.ToolResult("terraform structure (python-hcl2)", not errors, None,
                                f"{files} .tf files parsed, rules hold" if not errors else "\n".join(errors)))
    count, errors = manifests.check_all()
    out.append(tools.ToolResult("manifests (KubeRay CRDs, Kubernetes schemas)", not errors, None,
                                f"{count} objects valid" if not errors else "\n".join(errors)))
    out += policy_results()
    out.append(tools.yamllint(sorted((ROOT / "infra").rglob("*.yaml"))))
    out.append(tools.checkov(ROOT / "terraform", "terraform"))
    out.append(tools.checkov(ROOT / "infra" / "k8s", "kubernetes"))
    out.append(tools.checkov(ROOT / "infra" / "docker", "dockerfile"))
    return out


def policy_results(tf_root: Path = hcl.TERRAFORM_DIR, k8s_dir: Path = manifests.K8S_DIR) -> list[tools.ToolResult]:
    """The three doors: NetworkPolicy enforced, node credentials out of pods' reach, Ray's token auth."""
    trees = {}
    for path in hcl.tf_files(tf_root):
        try:
            trees[path] = hcl.parse(path)
        except Exception:  # reported by the structure check; the rest is still checked
            continue

    def result(name: str, errors: list[str], summary: str) -> tools.ToolResult:
        return tools.ToolResult(name, not errors, None, summary if not errors else "\n".join(errors))

    count, auth_errors = ray_auth.check_all(trees, k8s_dir)
    clusters = f"{len(cluster_policy.clusters(trees))} clusters"
    return [
        result("NetworkPolicy enforced (EKS vpc-cni enableNetworkPolicy, GKE Dataplane V2)",
               cluster_policy.network_policy_errors(trees), f"{clusters} enforce it"),
        result("node credentials out of pods' reach (IMDSv2 hop limit 1 + IRSA, GKE_METADATA + Workload Identity)",
               cluster_policy.node_credential_errors(trees), f"{clusters}, every node group"),
        result("Ray token auth from a Secret (head, workers, RayJob submitter)", auth_errors,
               f"{count} Ray resources (infra/k8s and Terraform's rendering of it)"),
    ]


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
