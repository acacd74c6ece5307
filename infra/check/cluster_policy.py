"""Two properties of the clusters terraform/ builds, read from the parsed .tf files (hcl.py):

- `network_policy_errors`: the NetworkPolicy of infra/k8s is enforced. On EKS the `vpc-cni` add-on enforces
  none unless its configuration sets `enableNetworkPolicy = "true"` (Ray's GCS, client, job and data-plane
  ports would be open to every pod); on GKE, Dataplane V2 or the network-policy add-on enforces it.
- `node_credential_errors`: no pod can take the node's cloud credentials. On EKS every node group and launch
  template answers IMDSv2 only (`http_tokens = "required"`) with a hop limit of 1, so a pod on the pod
  network (one hop further than the node) gets no answer, and what calls AWS does it with its own IRSA role;
  on GKE, Workload Identity is on and every node pool runs the GKE metadata server (`GKE_METADATA`), which
  hides the node's service account from pods.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from infra.check import hcl

EKS_MODULE = "terraform-aws-modules/eks/aws"
# EKS add-ons and charts that call AWS APIs: each needs a role of its own, the node role being out of pods' reach
AWS_CALLING_ADDONS = ("vpc-cni", "aws-efs-csi-driver", "aws-ebs-csi-driver")
AWS_CALLING_CHARTS = ("cluster-autoscaler", "aws-load-balancer-controller", "external-dns")
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
_JSONENCODE = re.compile(r"^\$\{jsonencode\((.*)\)\}$", re.S)
_HOP_LIMIT = re.compile(r"http_put_response_hop_limit\s*=\s*([^,}\s]+)")
_TOKENS = re.compile(r"http_tokens\s*=\s*([^,}\s]+)")

Trees = dict[Path, dict]


def _eks_modules(trees: Trees) -> list[tuple[str, dict]]:
    """(where, arguments) of every call of the EKS registry module."""
    return [(f"{hcl._rel(path)}: module {name}", body) for path, tree in trees.items()
            for name, body in hcl._blocks(tree, "module")
            if body.get("source") == EKS_MODULE]


def _gke_clusters(trees: Trees) -> list[tuple[str, dict]]:
    return [(f"{hcl._rel(path)}: google_container_cluster {name}", body) for path, tree in trees.items()
            for name, body in hcl._resources(tree, "google_container_cluster")]


def _eks_clusters(trees: Trees) -> list[tuple[str, dict]]:
    """EKS clusters declared as resources, not through the module."""
    return [(f"{hcl._rel(path)}: aws_eks_cluster {name}", body) for path, tree in trees.items()
            for name, body in hcl._resources(tree, "aws_eks_cluster")]


def clusters(trees: Trees) -> list[str]:
    """Where each cluster is declared: the EKS module's calls, EKS and GKE cluster resources."""
    return [where for where, _ in _eks_modules(trees) + _eks_clusters(trees) + _gke_clusters(trees)]


def decoded(value: Any) -> dict | None:
    """An add-on's `configuration_values`: `jsonencode({...})` of an HCL object, or a JSON string; None when
    it is neither (an expression this check cannot read)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    match = _JSONENCODE.match(value.strip())
    try:
        if match:
            import hcl2

            return hcl.normalise(hcl2.loads(f"v = {match.group(1)}\n"))["v"]
        return json.loads(value)
    except Exception:  # not a literal object: python-hcl2's lark errors or JSON's
        return None


def network_policy_errors(trees: Trees) -> list[str]:
    errors = []
    addons = []
    eks, gke = _eks_modules(trees), _gke_clusters(trees)
    for where, body in eks:
        cluster_addons = body.get("cluster_addons")
        entry = cluster_addons.get("vpc-cni") if isinstance(cluster_addons, dict) else None
        if entry is None:
            errors.append(f"{where}: no vpc-cni entry in cluster_addons, so nothing enforces NetworkPolicy")
        else:
            addons.append((f"{where}: vpc-cni add-on", entry))
    resources = [(f"{hcl._rel(path)}: aws_eks_addon {name}", body) for path, tree in trees.items()
                 for name, body in hcl._resources(tree, "aws_eks_addon") if body.get("addon_name") == "vpc-cni"]
    if not resources:
        errors += [f"{where}: no aws_eks_addon vpc-cni, so nothing enforces NetworkPolicy"
                   for where, _ in _eks_clusters(trees)]
    addons += resources
    for where, addon in addons:
        value = (decoded(addon.get("configuration_values")) or {}).get("enableNetworkPolicy")
        if value != "true":
            errors.append(f'{where}: configuration_values does not set enableNetworkPolicy = "true" (a string; got '
                          f"{value!r}): the VPC CNI enforces no NetworkPolicy")
    for where, body in gke:
        dataplane_v2 = body.get("datapath_provider") == "ADVANCED_DATAPATH"
        if not dataplane_v2 and hcl.first_block(body, "network_policy").get("enabled") is not True:
            errors.append(f"{where}: neither Dataplane V2 (datapath_provider = ADVANCED_DATAPATH) nor network_policy "
                          f"is on, so the cluster enforces no NetworkPolicy")
    if not clusters(trees):
        errors.append("no EKS module call, aws_eks_cluster or google_container_cluster found")
    return errors


def _imds_errors(where: str, options: Any) -> list[str]:
    """One `metadata_options` (an attribute or a block): IMDSv2 only and a hop limit of 1, unless IMDS is off."""
    options = options[0] if isinstance(options, list) and options else options
    if not isinstance(options, dict):
        return [f"{where}: metadata_options is not a literal object ({options!r}); this check cannot read it"]
    if options.get("http_endpoint") == "disabled":
        return []
    errors = []
    if options.get("http_tokens") != "required":
        errors.append(f"{where}: http_tokens is {options.get('http_tokens')!r}, not 'required' (IMDSv1 answers)")
    hop = options.get("http_put_response_hop_limit")
    if hop != 1:
        errors.append(f"{where}: http_put_response_hop_limit is {hop!r}, not 1: pods reach the instance metadata "
                      f"service and the node role's credentials")
    return errors


def _imds_text_errors(where: str, text: str) -> list[str]:
    """Metadata options written inside an expression (a `for` that builds node groups): read by pattern."""
    errors = [f"{where}: http_put_response_hop_limit = {v}, not 1" for v in _HOP_LIMIT.findall(text) if v != "1"]
    return errors + [f"{where}: http_tokens = {v}, not \"required\"" for v in _TOKENS.findall(text)
                     if v != '"required"']


def node_credential_errors(trees: Trees) -> list[str]:
    errors = []
    for where, body in _eks_modules(trees):
        for kind in ("eks_managed", "self_managed"):
            defaults = body.get(f"{kind}_node_group_defaults")
            if f"{kind}_node_groups" in body and not (isinstance(defaults, dict) and "metadata_options" in defaults):
                errors.append(f"{where}: {kind}_node_group_defaults sets no metadata_options (the module's own "
                              f"default has hop limit 2: pods reach the node role's credentials)")
        defaults = body.get("eks_managed_node_group_defaults")
        defaults = defaults if isinstance(defaults, dict) else {}
        if defaults.get("iam_role_attach_cni_policy") is not False:
            errors.append(f"{where}: the node role carries the CNI's permissions (eks_managed_node_group_defaults "
                          f"iam_role_attach_cni_policy is not false); the vpc-cni add-on has its own IRSA role")
        if body.get("enable_irsa") is False:
            errors.append(f"{where}: enable_irsa = false: no OIDC provider, so no IRSA roles")
        addons = body.get("cluster_addons") if isinstance(body.get("cluster_addons"), dict) else {}
        for name in AWS_CALLING_ADDONS:
            addon = addons.get(name)
            if addon is not None and not (addon.get("service_account_role_arn") or
                                          addon.get("pod_identity_association")):
                errors.append(f"{where}: add-on {name} calls AWS with no role of its own (service_account_role_arn)")
    for path, tree in trees.items():
        rel = hcl._rel(path)
        for name, body in hcl._resources(tree, "helm_release"):
            if body.get("chart") in AWS_CALLING_CHARTS and IRSA_ANNOTATION not in str(body.get("values")):
                errors.append(f"{rel}: helm_release {name} ({body.get('chart')}) calls AWS with no IRSA role "
                              f"(no {IRSA_ANNOTATION} annotation on its service account)")
        for trail, value in hcl.walk(tree):
            if trail and trail[-1] == "metadata_options":
                errors += _imds_errors(f"{rel}: {'.'.join(trail)}", value)
            elif isinstance(value, str) and ("http_put_response_hop_limit" in value or "http_tokens" in value):
                errors += _imds_text_errors(f"{rel}: {'.'.join(trail)}", value)
        for name, body in hcl._resources(tree, "aws_launch_template"):
            if "metadata_options" not in body:
                errors.append(f"{rel}: aws_launch_template {name} sets no metadata_options (IMDSv1 answers)")
    for where, body in _gke_clusters(trees):
        if not hcl.first_block(body, "workload_identity_config").get("workload_pool"):
            errors.append(f"{where}: Workload Identity is off (no workload_identity_config.workload_pool)")
    pools = [(f"{hcl._rel(p)}: google_container_node_pool {n}", b) for p, t in trees.items()
             for n, b in hcl._resources(t, "google_container_node_pool")]
    pools += [(f"{where} (default pool)", body) for where, body in _gke_clusters(trees) if "node_config" in body]
    for where, body in pools:
        mode = hcl.first_block(hcl.first_block(body, "node_config"), "workload_metadata_config").get("mode")
        if mode != "GKE_METADATA":
            errors.append(f"{where}: workload_metadata_config mode is {mode!r}, not GKE_METADATA: pods see the "
                          f"node's service account")
    return errors
