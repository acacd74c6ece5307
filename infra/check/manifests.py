"""Every Kubernetes manifest we ship, validated offline: KubeRay custom resources against the vendored CRDs
(crd.py), core objects against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict), and the
Prometheus Operator's monitors, whose CRDs are not vendored, by what they must match in our pods."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from infra.check import crd

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "infra" / "k8s"
# The Kubernetes minor whose schemas core objects are checked against: the clusters' default version
KUBERNETES_VERSION = "1.33"
MONITORING_API = "monitoring.coreos.com/v1"


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int  # the document's position in its file
    doc: dict

    @property
    def name(self) -> str:
        meta = self.doc.get("metadata") or {}
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}#{self.index} {self.doc.get('kind')}/{meta.get('name')}"


def manifest_files(root: Path = K8S_DIR) -> list[Path]:
    """Our manifests: every YAML file under infra/k8s but the vendored CRDs."""
    return sorted(p for p in root.rglob("*.yaml") if "crds" not in p.relative_to(root).parts)


def load(paths: list[Path]) -> Iterator[Manifest]:
    for path in paths:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield Manifest(path, i, doc)


def validate(m: Manifest) -> list[str]:
    """Errors of one manifest; empty when it is valid."""
    doc = m.doc
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object: apiVersion and kind are required"]
    if (doc["apiVersion"], doc["kind"]) in crd.known_kinds():
        return crd.validate(doc)
    if doc["apiVersion"] == MONITORING_API:
        return []  # checked against the pods they scrape: monitor_errors
    return _core_errors(doc)


def _core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {KUBERNETES_VERSION}"]
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(root)"
        return [f"{where}: {e.message}"]
    return []


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayService (`rayClusterConfig`) or RayJob (`rayClusterSpec`); {} otherwise."""
    spec = doc.get("spec", {})
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or {}


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(group, pod template) of each Ray node group of a RayService or RayJob."""
    cluster = cluster_spec(doc)
    if "headGroupSpec" in cluster:
        yield "head", cluster["headGroupSpec"].get("template", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield group.get("groupName", "?"), group.get("template", {})


def gpu_node_pools(root: Path = K8S_DIR) -> set[str]:
    """The node pools (`expertmesh.io/pool`) the Ray GPU worker groups select: the clusters must make them."""
    pools = set()
    for m in load(manifest_files(root)):
        for group, template in pod_templates(m.doc):
            if group != "head":
                pools.add(template.get("spec", {}).get("nodeSelector", {}).get("expertmesh.io/pool"))
    return pools


def monitor_errors(monitor: dict, targets: list[dict]) -> list[str]:
    """A PodMonitor must select Ray pods of `targets` (RayServices/RayJobs), in their namespace, and
    scrape ports those pods name."""
    if monitor.get("kind") != "PodMonitor":
        return [f"unexpected monitoring kind {monitor.get('kind')}"]
    spec = monitor.get("spec", {})
    wanted = spec.get("selector", {}).get("matchLabels", {})
    namespaces = spec.get("namespaceSelector", {}).get("matchNames", [])
    errors = []
    matched = []
    for target in targets:
        if namespaces and target["metadata"].get("namespace") not in namespaces:
            continue
        for group, template in pod_templates(target):
            # KubeRay labels every Ray pod it makes with these, besides the template's own labels
            head = group == "head"
            labels = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if head else "worker",
                      "ray.io/group": "headgroup" if head else group,
                      **template.get("metadata", {}).get("labels", {})}
            if all(labels.get(k) == v for k, v in wanted.items()):
                ports = {p.get("name") for c in template.get("spec", {}).get("containers", [])
                         for p in c.get("ports", [])}
                matched.append((f"{target['kind']}/{target['metadata']['name']} {group}", ports))
    if not matched:
        return [f"spec.selector {wanted} selects no Ray pod of the shipped manifests"]
    for i, endpoint in enumerate(spec.get("podMetricsEndpoints", [])):
        port = endpoint.get("port")
        missing = [where for where, ports in matched if port not in ports]
        # the Serve port is optional on a group (a RayJob's pods serve nothing); the metrics port is not
        if missing and port != "serve":
            errors.append(f"spec.podMetricsEndpoints[{i}].port {port!r} is not a port of {', '.join(missing)}")
    if not spec.get("podMetricsEndpoints"):
        errors.append("spec.podMetricsEndpoints: required")
    return errors


def check_all(root: Path = K8S_DIR) -> tuple[int, list[str]]:
    """(manifests checked, errors as 'manifest: error') of every manifest under `root`."""
    manifests = list(load(manifest_files(root)))
    errors = [f"{m.name}: {e}" for m in manifests for e in validate(m)]
    targets = [m.doc for m in manifests if m.doc.get("apiVersion", "").startswith("ray.io/")]
    for m in manifests:
        if m.doc.get("apiVersion") == MONITORING_API:
            errors += [f"{m.name}: {e}" for e in monitor_errors(m.doc, targets)]
    return len(manifests), errors
