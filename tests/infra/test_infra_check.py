"""`make infra-check`'s checks of terraform/ and the tools it runs: they pass on what we ship, and fail on a
broken copy (a variable without its type, a GPU group that cannot scale to zero, an unpinned chart...)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.check import hcl, manifests, tools

ROOT = Path(__file__).resolve().parents[2]
GPU_POOLS = {"gpu-attention", "gpu-experts"}


def _skip_unless_ran(result: tools.ToolResult) -> tools.ToolResult:
    if result.skipped:
        pytest.skip(result.skipped)
    return result


def test_terraform_structure_holds_and_matches_the_manifests():
    assert manifests.gpu_node_pools() == GPU_POOLS
    files, errors = hcl.check_all(expected_gpu_groups=GPU_POOLS)
    assert errors == []
    assert files >= 20


@pytest.fixture
def tf_copy(tmp_path) -> Path:
    dst = tmp_path / "terraform"
    shutil.copytree(ROOT / "terraform", dst)
    return dst


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def _sub(path: Path, pattern: str, new: str) -> None:
    text, n = re.subn(pattern, new, path.read_text(), count=1, flags=re.M)
    assert n == 1, f"{pattern!r} not in {path}"
    path.write_text(text)


@pytest.mark.parametrize("breakage,needle", [
    (lambda t: _sub(t / "modules/gpu-cluster-eks/variables.tf", r'^(variable "kubernetes_version" \{\n(?:.*\n)*?)'
                                                                r'  type\s+= string\n', r"\1"),
     "variable kubernetes_version has no type"),
    (lambda t: _sub(t / "modules/gpu-cluster-gke/variables.tf", r'^(variable "gpu_node_pools" \{\n)  description = ',
                    r'\1  notes = '),
     "variable gpu_node_pools has no description"),
    (lambda t: _sub(t / "modules/gpu-cluster-eks/addons.tf", r'version\s+= "0\.17\.1"', 'version = ">= 0.17.1"'),
     "helm_release nvidia_device_plugin does not pin an exact chart version"),
    (lambda t: _sub(t / "modules/gpu-cluster-eks/main.tf", r'^  version = "20\.37\.2"\n', ""),
     "module eks (terraform-aws-modules/eks/aws) does not pin an exact version"),
    (lambda t: _sub(t / "examples/gke-mixtral/versions.tf", r'version = "~> 2\.36"', 'version = ">= 2.36"'),
     "provider kubernetes needs a bounded version constraint"),
    (lambda t: _sub(t / "examples/eks-deepseek/versions.tf", r"^  required_version.*\n", ""),
     "examples/eks-deepseek: no terraform { required_version }"),
    (lambda t: _sub(t / "examples/eks-deepseek/main.tf", r"min_size\s+= 0", "min_size       = 1"),
     "GPU group gpu-attention has min_size 1, not 0"),
    (lambda t: _sub(t / "examples/gke-mixtral/main.tf", r'"gpu-experts"', '"gpu-expert"'),
     "are not the manifests' node pools"),
    (lambda t: _sub(t / "modules/gpu-cluster-gke/node_pools.tf", r'effect = "NO_SCHEDULE"',
                    'effect = "PREFER_NO_SCHEDULE"'),
     "GPU node pool lacks the taint"),
    (lambda t: _sub(t / "modules/gpu-cluster-eks/node_groups.tf", r'effect = "NO_SCHEDULE"',
                    'effect = "NO_EXECUTE"'),
     "GPU node groups lack the taint"),
    (lambda t: _sub(t / "modules/gpu-cluster-eks/variables.tf", r"g\.min_size >= 0", "g.min_size >= 1"),
     "does not validate min_size >= 0"),
    (lambda t: (t / "modules/gpu-cluster-gke/broken.tf").write_text('variable "x" {\n  type = string\n'),
     "broken.tf: does not parse"),
    (lambda t: _sub(t / "modules/expertmesh-app/main.tf", r'"networkpolicy\.yaml",\n', ""),
     "modules/expertmesh-app: does not apply infra/k8s/networkpolicy.yaml"),
    (lambda t: _sub(t / "modules/expertmesh-app/main.tf", r'"rayservice\.yaml"', '"ray-service.yaml"'),
     "applies ray-service.yaml, which is not in infra/k8s"),
    (lambda t: _sub(t / "modules/kuberay-stack/main.tf", r'^  version = "1\.7\.0"\n', ""),
     "helm_release kuberay_operator does not pin an exact chart version"),
])
def test_a_broken_copy_fails_naming_what_broke(tf_copy, breakage, needle):
    breakage(tf_copy)
    _, errors = hcl.check_all(tf_copy, expected_gpu_groups=GPU_POOLS)
    assert any(needle in e for e in errors), errors


def test_terraform_fmt(tmp_path):
    assert _skip_unless_ran(tools.terraform_fmt()).ok
    bad = tmp_path / "bad.tf"
    bad.write_text('variable "x" {\ntype=string\n  description = "x"\n}\n')
    result = tools.terraform_fmt(tmp_path)
    assert not result.ok and "bad.tf" in result.detail


def test_yamllint(tmp_path):
    assert _skip_unless_ran(tools.yamllint(sorted((ROOT / "infra").rglob("*.yaml")))).ok
    bad = ROOT / "infra" / "k8s" / "models-pvc.yaml"
    copy = tmp_path / "pvc.yaml"
    copy.write_text(bad.read_text().replace("  accessModes:", "  accessModes:   ") + "\n\n")
    result = tools.yamllint([copy])
    assert not result.ok and "too many blank lines" in result.detail


def test_checkov_passes_on_what_we_ship_and_fails_on_a_privileged_pod(tmp_path):
    assert _skip_unless_ran(tools.checkov(ROOT / "terraform", "terraform")).ok
    assert tools.checkov(ROOT / "infra" / "k8s", "kubernetes").ok
    assert tools.checkov(ROOT / "infra" / "docker", "dockerfile").ok
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: expertmesh}\n"
        "spec:\n  containers:\n    - name: c\n      image: expertmesh:0.1.0\n"
        "      securityContext: {privileged: true}\n")
    result = tools.checkov(tmp_path, "kubernetes")
    assert not result.ok and "CKV_K8S_16" in result.detail  # privileged container


def test_make_infra_check_entrypoint_passes():
    done = subprocess.run([sys.executable, "-m", "infra.check"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "infra-check: all passed" in done.stdout


def test_network_policy_admits_the_namespaces_terraform_installs_into():
    """The NetworkPolicy lets the KubeRay operator and Prometheus in by namespace name: the names the
    Terraform stack installs them into."""
    tree = hcl.parse(ROOT / "terraform" / "modules" / "kuberay-stack" / "main.tf")
    releases = {name: body for entry in tree["resource"] for t, named in entry.items() if t == "helm_release"
                for name, body in named.items()}
    (monitoring,) = [b["monitoring_namespace"] for b in tree["locals"] if "monitoring_namespace" in b]
    assert releases["kube_prometheus_stack"]["namespace"] == "${local.monitoring_namespace}"
    (policy,) = [m.doc for m in manifests.load(manifests.manifest_files()) if m.doc["kind"] == "NetworkPolicy"]
    admitted = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                for rule in policy["spec"]["ingress"] for peer in rule.get("from", []) if "namespaceSelector" in peer}
    assert admitted == {releases["kuberay_operator"]["namespace"], monitoring}
