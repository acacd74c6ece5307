"""`make infra-check`'s three security checks: the NetworkPolicy is enforced (EKS vpc-cni add-on, GKE Dataplane V2),
no pod reaches the node's credentials (IMDSv2 with hop limit 1 and IRSA; GKE_METADATA and Workload Identity), and
every KubeRay cluster runs Ray's token auth with the token from a Secret Terraform makes. Each holds on what we
ship and fails, naming the problem, on a copy broken in one place."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml

from infra.check import __main__ as infra_check
from infra.check import cluster_policy, hcl, manifests, ray_auth

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


def _trees(root: Path) -> dict[Path, dict]:
    return {p: hcl.parse(p) for p in hcl.tf_files(root)}


@pytest.fixture
def tf_copy(tmp_path) -> Path:
    dst = tmp_path / "terraform"
    shutil.copytree(ROOT / "terraform", dst)
    return dst


def _sub(path: Path, pattern: str, new: str) -> None:
    text, n = re.subn(pattern, new, path.read_text(), count=1, flags=re.M)
    assert n == 1, f"{pattern!r} not in {path}"
    path.write_text(text)


def test_each_check_holds_on_what_we_ship():
    trees = _trees(hcl.TERRAFORM_DIR)
    assert len(cluster_policy.clusters(trees)) == 2  # the EKS module call and the GKE cluster
    assert cluster_policy.network_policy_errors(trees) == []
    assert cluster_policy.node_credential_errors(trees) == []
    count, errors = ray_auth.check_all(trees)
    assert errors == []
    assert count == 4  # the RayService and the RayJob, as shipped and as Terraform renders them
    results = infra_check.policy_results()
    assert len(results) == 3 and all(r.ok and not r.skipped for r in results), results


def test_the_vpc_cni_addon_enforces_network_policy():
    (eks,) = [b for t in _trees(hcl.TERRAFORM_DIR).values() for n, b in hcl._blocks(t, "module") if n == "eks"]
    config = cluster_policy.decoded(eks["cluster_addons"]["vpc-cni"]["configuration_values"])
    assert config == {"enableNetworkPolicy": "true"}


EKS = "modules/gpu-cluster-eks"
GKE = "modules/gpu-cluster-gke"
NETWORK_POLICY_BREAKAGES = [
    (lambda t: _sub(t / EKS / "main.tf", r'enableNetworkPolicy = "true"', 'enableNetworkPolicy = "false"'),
     "vpc-cni add-on: configuration_values does not set enableNetworkPolicy = \"true\" (a string; got 'false')"),
    (lambda t: _sub(t / EKS / "main.tf", r"^      configuration_values = jsonencode\(\{\n.*\n      \}\)\n", ""),
     "vpc-cni add-on: configuration_values does not set enableNetworkPolicy"),
    (lambda t: _sub(t / EKS / "main.tf", r"^    vpc-cni = \{\n(?:.*\n)*?    \}\n", ""),
     "module eks: no vpc-cni entry in cluster_addons"),
    (lambda t: _sub(t / GKE / "cluster.tf", r'"ADVANCED_DATAPATH"', '"LEGACY_DATAPATH"'),
     "google_container_cluster this: neither Dataplane V2"),
    (lambda t: (t / EKS / "raw.tf").write_text(
        'resource "aws_eks_addon" "cni" {\n  cluster_name = "x"\n  addon_name   = "vpc-cni"\n}\n'),
     "aws_eks_addon cni: configuration_values does not set enableNetworkPolicy"),
]

NODE_CREDENTIAL_BREAKAGES = [
    (lambda t: _sub(t / EKS / "main.tf", r"http_put_response_hop_limit = 1", "http_put_response_hop_limit = 2"),
     "eks_managed_node_group_defaults.metadata_options: http_put_response_hop_limit is 2, not 1"),
    (lambda t: _sub(t / EKS / "main.tf", r'http_tokens\s+= "required"', 'http_tokens = "optional"'),
     "http_tokens is 'optional', not 'required'"),
    (lambda t: _sub(t / EKS / "main.tf", r"^    metadata_options = \{\n(?:.*\n)*?    \}\n", ""),
     "module eks: eks_managed_node_group_defaults sets no metadata_options"),
    # one node group overriding the defaults, in a literal local and inside the `for` that builds the GPU groups
    (lambda t: _sub(t / EKS / "node_groups.tf", r'^      ami_type       = "AL2023_x86_64_STANDARD"\n',
                    '      ami_type = "AL2023_x86_64_STANDARD"\n      metadata_options = {\n'
                    '        http_tokens = "required"\n        http_put_response_hop_limit = 2\n      }\n'),
     "locals.system_node_group.system.metadata_options: http_put_response_hop_limit is 2, not 1"),
    (lambda t: _sub(t / EKS / "node_groups.tf", r"^      ami_type       = var\.gpu_ami_type\n",
                    '      ami_type = var.gpu_ami_type\n      metadata_options = {\n'
                    '        http_tokens = "optional"\n        http_put_response_hop_limit = 3\n      }\n'),
     "locals.gpu_node_groups: http_put_response_hop_limit = 3, not 1"),
    (lambda t: (t / EKS / "lt.tf").write_text('resource "aws_launch_template" "gpu" {\n  name = "gpu"\n}\n'),
     "aws_launch_template gpu sets no metadata_options"),
    (lambda t: _sub(t / EKS / "main.tf", r"^    iam_role_attach_cni_policy = false\n", ""),
     "the node role carries the CNI's permissions"),
    (lambda t: _sub(t / EKS / "main.tf", r"^      service_account_role_arn = module\.vpc_cni_irsa\.iam_role_arn\n", ""),
     "add-on vpc-cni calls AWS with no role of its own"),
    (lambda t: _sub(t / EKS / "addons.tf", r'"eks\.amazonaws\.com/role-arn" = ', '"example.com/role" = '),
     "helm_release cluster_autoscaler (cluster-autoscaler) calls AWS with no IRSA role"),
    (lambda t: _sub(t / GKE / "node_pools.tf", r'mode = "GKE_METADATA"', 'mode = "GCE_METADATA"'),
     "google_container_node_pool system: workload_metadata_config mode is 'GCE_METADATA', not GKE_METADATA"),
    (lambda t: _sub(t / GKE / "cluster.tf", r"^  workload_identity_config \{\n.*\n  \}\n", ""),
     "google_container_cluster this: Workload Identity is off"),
]


@pytest.mark.parametrize("breakage,needle", NETWORK_POLICY_BREAKAGES)
def test_network_policy_not_enforced_is_caught(tf_copy, breakage, needle):
    assert cluster_policy.network_policy_errors(_trees(tf_copy)) == []
    breakage(tf_copy)
    errors = cluster_policy.network_policy_errors(_trees(tf_copy))
    assert any(needle in e for e in errors), errors


@pytest.mark.parametrize("breakage,needle", NODE_CREDENTIAL_BREAKAGES)
def test_node_credentials_within_pods_reach_are_caught(tf_copy, breakage, needle):
    assert cluster_policy.node_credential_errors(_trees(tf_copy)) == []
    breakage(tf_copy)
    errors = cluster_policy.node_credential_errors(_trees(tf_copy))
    assert any(needle in e for e in errors), errors


def test_infra_check_reports_a_broken_terraform_copy(tf_copy):
    _sub(tf_copy / EKS / "main.tf", r"http_put_response_hop_limit = 1", "http_put_response_hop_limit = 2")
    results = {r.name.split(" (")[0]: r for r in infra_check.policy_results(tf_copy)}
    assert not results["node credentials out of pods' reach"].ok
    assert "http_put_response_hop_limit is 2" in results["node credentials out of pods' reach"].detail
    assert results["NetworkPolicy enforced"].ok and results["Ray token auth from a Secret"].ok


# Ray's token auth: the shipped RayService and RayJob, each broken in one place
def _shipped() -> list[tuple[str, dict]]:
    return [(m.name, m.doc) for m in manifests.load(manifests.manifest_files())]


def _ray(documents: list[tuple[str, dict]], kind: str) -> dict:
    (doc,) = [d for _, d in documents if d.get("kind") == kind]
    return doc


def _cluster(doc: dict) -> dict:
    return manifests.cluster_spec(doc)


def _env(container: dict, name: str) -> dict:
    (var,) = [e for e in container["env"] if e["name"] == name]
    return var


def _head(doc: dict) -> dict:
    return _cluster(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(doc: dict, group: str) -> dict:
    (g,) = [g for g in _cluster(doc)["workerGroupSpecs"] if g["groupName"] == group]
    return g["template"]["spec"]["containers"][0]


def _submitter(doc: dict) -> dict:
    return doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


RAY_AUTH_BREAKAGES = [
    ("RayService", lambda d: _cluster(d).pop("authOptions"),
     "RayService/expertmesh: authOptions.mode is None, not 'token'"),
    ("RayJob", lambda d: _cluster(d)["authOptions"].update(mode="disabled"),
     "RayJob/expertmesh-finetune: authOptions.mode is 'disabled', not 'token'"),
    ("RayService", lambda d: _cluster(d)["authOptions"].pop("secretName"), "authOptions.secretName is not set"),
    ("RayJob", lambda d: _cluster(d).update(rayVersion="2.51.1"), "rayVersion '2.51.1' has no token auth"),
    ("RayService", lambda d: _head(d)["env"].remove(_env(_head(d), "RAY_AUTH_MODE")),
     "head container ray-head: RAY_AUTH_MODE is None, not 'token'"),
    ("RayService", lambda d: _worker(d, "gpu-experts")["env"].remove(_env(_worker(d, "gpu-experts"), "RAY_AUTH_TOKEN")),
     "gpu-experts container ray-worker: sets no RAY_AUTH_TOKEN"),
    ("RayJob", lambda d: _env(_worker(d, "gpu-attention"), "RAY_AUTH_TOKEN").update(value="sekrit"),
     "gpu-attention container ray-worker: RAY_AUTH_TOKEN is a literal in the manifest"),
    ("RayService", lambda d: _env(_head(d), "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(
        name="expertmesh-api-key"),
     "head container ray-head: RAY_AUTH_TOKEN comes from expertmesh-api-key/auth_token, not from the Secret"),
    ("RayJob", lambda d: d["spec"].pop("submitterPodTemplate"), "spec.submitterPodTemplate is missing"),
    ("RayJob", lambda d: _submitter(d)["env"].remove(_env(_submitter(d), "RAY_AUTH_TOKEN")),
     "submitter container ray-job-submitter: sets no RAY_AUTH_TOKEN"),
    ("RayJob", lambda d: _env(_submitter(d), "RAY_AUTH_MODE").update(value="disabled"),
     "submitter container ray-job-submitter: RAY_AUTH_MODE is 'disabled', not 'token'"),
    ("RayService", lambda d: _cluster(d)["headGroupSpec"]["template"]["spec"]["containers"].append(
        {"name": "sidecar", "image": "x", "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}),
     "container sidecar sets RAY_AUTH_MODE 'disabled'"),
]


@pytest.mark.parametrize("kind,edit,needle", RAY_AUTH_BREAKAGES)
def test_a_ray_cluster_without_token_auth_from_the_secret_is_caught(kind, edit, needle):
    trees = _trees(hcl.TERRAFORM_DIR)
    documents = copy.deepcopy(_shipped())
    assert ray_auth.check(documents, trees) == []
    edit(_ray(documents, kind))
    errors = ray_auth.check(documents, trees)
    assert any(needle in e for e in errors), errors


def test_a_bare_raycluster_is_checked_too():
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "open"},
           "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": "x"}]}}}}}
    errors = ray_auth.check([("open", doc)], _trees(hcl.TERRAFORM_DIR))
    assert "open: authOptions.mode is None, not 'token': Ray runs without token auth" in errors
    assert "open: head container ray-head: sets no RAY_AUTH_TOKEN" in errors


def test_a_secret_in_the_repository_is_caught():
    documents = _shipped() + [("infra/k8s/ray-auth.yaml#0 Secret/expertmesh-ray-auth", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "expertmesh-ray-auth"},
        "stringData": {"auth_token": "sekrit"}})]
    errors = ray_auth.check(documents, _trees(hcl.TERRAFORM_DIR))
    assert any("a Secret in the repository puts its value in git" in e for e in errors), errors


APP = "modules/expertmesh-app/main.tf"
TERRAFORM_SECRET_BREAKAGES = [
    (lambda t: _sub(t / APP, r'name      = "expertmesh-ray-auth"', 'name      = "ray-auth"'),
     "Secret expertmesh-ray-auth (authOptions.secretName of infra/k8s/rayjob-finetune.yaml#1 RayJob/"
     "expertmesh-finetune, infra/k8s/rayservice.yaml#0 RayService/expertmesh, "),
    (lambda t: _sub(t / APP, r"auth_token = random_password\.ray_auth_token\.result", 'token = "x"'),
     "Secret expertmesh-ray-auth has no key auth_token"),
    (lambda t: _sub(t / APP, r"auth_token = random_password\.ray_auth_token\.result", 'auth_token = "sekrit"'),
     "Secret expertmesh-ray-auth holds a literal token"),
    (lambda t: (t / "modules/expertmesh-app/inline.tf").write_text(
        'resource "kubectl_manifest" "open" {\n  yaml_body = <<-EOT\n    apiVersion: ray.io/v1\n'
        '    kind: RayCluster\n    metadata: {name: open}\n  EOT\n}\n'),
     "resource.kubectl_manifest.open.yaml_body writes a Ray resource inline"),
    (lambda t: (t / "modules/expertmesh-app/inline.tf").write_text(
        'resource "kubernetes_manifest" "open" {\n  manifest = {\n    apiVersion = "ray.io/v1"\n'
        '    kind       = "RayJob"\n  }\n}\n'),
     "resource.kubernetes_manifest.open.manifest writes a Ray resource inline"),
    # Terraform's rendering of the manifests: a replacement that strips the token, one this check cannot follow
    (lambda t: (_sub(t / APP, r"content = replace\(", "content = replace(replace("),
                _sub(t / APP, r'"expertmesh:0\.1\.0", var\.image\)',
                     '"expertmesh:0.1.0", var.image), "mode: token", "mode: disabled")')),
     "terraform/modules/expertmesh-app renders rayservice.yaml#0: authOptions.mode is 'disabled'"),
    (lambda t: _sub(t / APP, r'content = replace\(', "content = templatefile(\"x\", {}) == \"\" ? \"\" : replace("),
     "data.kubectl_file_documents.expertmesh renders the manifests in a way this check cannot follow"),
]


@pytest.mark.parametrize("breakage,needle", TERRAFORM_SECRET_BREAKAGES)
def test_terraform_that_does_not_make_the_secret_or_bypasses_the_check_is_caught(tf_copy, breakage, needle):
    assert ray_auth.check_all(_trees(tf_copy))[1] == []
    breakage(tf_copy)
    count, errors = ray_auth.check_all(_trees(tf_copy))
    assert any(needle in e for e in errors), errors


def test_terraform_renders_the_manifests_with_their_auth():
    """What the expertmesh-app module applies is infra/k8s with the image and the model source swapped in, and
    nothing else: the Ray resources it renders carry the same auth."""
    documents, errors = ray_auth.rendered(_trees(hcl.TERRAFORM_DIR), K8S)
    assert errors == []
    by_kind = {d["kind"]: d for _, d in documents}
    for kind, name in (("RayService", "rayservice.yaml"), ("RayJob", "rayjob-finetune.yaml")):
        shipped = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d and d["kind"] == kind][0]
        assert _cluster(by_kind[kind])["authOptions"] == _cluster(shipped)["authOptions"] == {
            "mode": "token", "secretName": "expertmesh-ray-auth"}
        assert _head(by_kind[kind])["image"] == "var.image"
    assert _submitter(by_kind["RayJob"])["image"] == "var.image"
