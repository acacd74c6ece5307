"""Ray's token auth on every KubeRay cluster we ship, the token from a Secret that Terraform creates.

Without it anyone who reaches a Ray head's job API runs code on the GPU nodes. Each RayCluster, RayService and
RayJob, as in infra/k8s and as the Terraform module renders them (image and model source swapped in), must
have
- `authOptions` with `mode: token` and a `secretName`: Ray runs with RAY_AUTH_MODE=token and the KubeRay
  operator sends that Secret's token with its own calls to the dashboard (Serve deploys, job status);
- RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret (key `auth_token`, the key KubeRay reads) on the
  Ray container of the head and of every worker group, and on a RayJob's submitter (K8sJobMode's
  `submitterPodTemplate`), which runs `ray job submit` against the head;
and the Secret is made by a Terraform `kubernetes_secret` from a generated value, never by a manifest in git.
No Ray resource may be written inline in a .tf file, where this check would not see it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from infra.check import hcl, manifests

AUTH_SECRET_KEY = "auth_token"
MIN_RAY_VERSION = (2, 52, 0)  # the first Ray with token auth; KubeRay refuses `mode: token` on an older one
# where each kind keeps its RayCluster spec
CLUSTER_SPEC = {"RayCluster": None, "RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}
_INLINE_RAY = re.compile(r"""kind["']?\s*[:=]\s*["']?Ray(Cluster|Service|Job)\b""")
# `${replace(replace(file(".../infra/k8s/${each.key}"), "old", var.x), "old", "new ${var.y}")}`
_STRING = r'"(?:[^"\\]|\\.)*"'
_PAIR = re.compile(rf",\s*({_STRING}),\s*(var\.\w+|{_STRING})\)")
_RENDER = re.compile(rf'\$\{{((?:replace\()*)file\("[^"]*/infra/k8s/\$\{{each\.key\}}"\)((?:{_PAIR.pattern})*)\}}')


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _container_errors(where: str, template: Any, secret: str | None) -> list[str]:
    """The first container (KubeRay's Ray container; the submitter's `ray job submit`) takes the token from
    `secret`; no container turns token auth off."""
    containers = (template or {}).get("spec", {}).get("containers") or []
    if not containers:
        return [f"{where}: no container"]
    ray = containers[0]
    where = f"{where} container {ray.get('name')}"
    env = _env(ray)
    errors = []
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    if mode != "token":
        errors.append(f"{where}: RAY_AUTH_MODE is {mode!r}, not 'token'")
    token = env.get("RAY_AUTH_TOKEN")
    ref = ((token or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if token is None:
        errors.append(f"{where}: sets no RAY_AUTH_TOKEN")
    elif "value" in token:
        errors.append(f"{where}: RAY_AUTH_TOKEN is a literal in the manifest; take it from the Secret {secret}")
    elif (ref.get("name"), ref.get("key")) != (secret, AUTH_SECRET_KEY):
        errors.append(f"{where}: RAY_AUTH_TOKEN comes from {ref.get('name')}/{ref.get('key')}, not from the Secret "
                      f"of authOptions ({secret}/{AUTH_SECRET_KEY})")
    for other in containers[1:]:
        value = _env(other).get("RAY_AUTH_MODE", {}).get("value", "token")
        if value != "token":
            errors.append(f"{where}: container {other.get('name')} sets RAY_AUTH_MODE {value!r}")
    return errors


def resource_errors(doc: dict) -> tuple[str | None, list[str]]:
    """(the Secret it takes the token from, errors) of one RayCluster, RayService or RayJob."""
    spec = doc.get("spec") or {}
    key = CLUSTER_SPEC[doc["kind"]]
    cluster = (spec if key is None else spec.get(key)) or {}
    auth = cluster.get("authOptions") or {}
    secret = auth.get("secretName") or None
    errors = []
    if auth.get("mode") != "token":
        errors.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token': Ray runs without token auth")
    if not secret:
        errors.append("authOptions.secretName is not set: the token must come from the Secret Terraform creates")
    version = tuple(int(p) for p in re.findall(r"\d+", str(cluster.get("rayVersion", "")))[:3])
    if version < MIN_RAY_VERSION:
        errors.append(f"rayVersion {cluster.get('rayVersion')!r} has no token auth (it needs Ray >= 2.52.0)")
    if auth.get("enableK8sTokenAuth") and doc["kind"] != "RayCluster":
        errors.append(f"authOptions.enableK8sTokenAuth: KubeRay does not support it on a {doc['kind']}")
    for group, template in manifests.pod_templates({"spec": {"rayClusterConfig": cluster}}):
        errors += _container_errors(group, template, secret)
    if doc["kind"] == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        if not spec.get("submitterPodTemplate"):
            errors.append("spec.submitterPodTemplate is missing: KubeRay's default submitter would carry the token "
                          "only by the operator's injection, which this check cannot see")
        else:
            errors += _container_errors("submitter", spec["submitterPodTemplate"], secret)
    return secret, errors


def _is_ray(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/") \
        and doc.get("kind") in CLUSTER_SPEC


def rendered(trees: dict[Path, dict], k8s_dir: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """((name, document) of every manifest a Terraform module renders from infra/k8s, errors): each module's
    `local.manifest_files`, read and put through its `kubectl_file_documents` replacements (a variable
    becomes `var.NAME`)."""
    out, errors = [], []
    for path, tree in trees.items():
        names = [n for block in tree.get("locals", []) if "manifest_files" in block
                 for n in re.findall(r'"([^"]+\.yaml)"', str(block["manifest_files"]))]
        sources = [(n, b) for entry in tree.get("data", []) for t, named in entry.items()
                   if t == "kubectl_file_documents" for n, b in named.items()]
        module = hcl._rel(path.parent)
        for data_name, body in sources:
            content = str(body.get("content", ""))
            match = _RENDER.fullmatch(content)
            pairs = _PAIR.findall(match.group(2)) if match else []
            if not match or len(pairs) != match.group(1).count("replace("):
                errors.append(f"{module}: data.kubectl_file_documents.{data_name} renders the manifests in a way "
                              f"this check cannot follow: {content}")
                continue
            for name in names:
                text = (k8s_dir / name).read_text()
                for old, new in pairs:
                    new = new[1:-1] if new.startswith('"') else "${" + new + "}"
                    text = text.replace(old[1:-1], re.sub(r"\$\{(var\.\w+)\}", r"\1", new))
                out += [(f"{module} renders {name}#{i}", d) for i, d in enumerate(yaml.safe_load_all(text)) if d]
    return out, errors


def _terraform_secrets(trees: dict[Path, dict]) -> dict[str, tuple[str, dict]]:
    """Secret name -> (where, data) of every kubernetes_secret in terraform/."""
    return {str(hcl.first_block(body, "metadata").get("name")): (f"{hcl._rel(path)}: {t} {name}", body.get("data"))
            for path, tree in trees.items() for t in ("kubernetes_secret", "kubernetes_secret_v1")
            for name, body in hcl._resources(tree, t)}


def check(documents: list[tuple[str, dict]], trees: dict[Path, dict]) -> list[str]:
    """Errors of the Ray resources among `documents` ((name, document) pairs) and of the Secrets they name."""
    errors = []
    users: dict[str, list[str]] = {}
    for name, doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            errors.append(f"{name}: a Secret in the repository puts its value in git; Terraform creates the Secrets")
        if not _is_ray(doc):
            continue
        secret, found = resource_errors(doc)
        errors += [f"{name}: {e}" for e in found]
        if secret:
            users.setdefault(secret, []).append(name)
    if not users and not errors:
        errors.append("no RayCluster, RayService or RayJob found")
    secrets = _terraform_secrets(trees)
    for secret, names in sorted(users.items()):
        if secret not in secrets:
            errors.append(f"Secret {secret} (authOptions.secretName of {', '.join(names)}) is made by no Terraform "
                          f"kubernetes_secret")
            continue
        where, data = secrets[secret]
        value = (data or {}).get(AUTH_SECRET_KEY) if isinstance(data, dict) else None
        if value is None:
            errors.append(f"{where}: Secret {secret} has no key {AUTH_SECRET_KEY}, where KubeRay reads the token")
        elif not str(value).startswith("${"):
            errors.append(f"{where}: Secret {secret} holds a literal token; generate it (random_password) or take a "
                          f"sensitive variable")
    for path, tree in trees.items():
        for trail, value in hcl.walk(tree):
            if (isinstance(value, str) and _INLINE_RAY.search(value)) or _is_ray(value):
                errors.append(f"{hcl._rel(path)}: {'.'.join(trail)} writes a Ray resource inline; ship it in "
                              f"infra/k8s, where infra-check checks its auth")
    return errors


def check_all(trees: dict[Path, dict], k8s_dir: Path = manifests.K8S_DIR) -> tuple[int, list[str]]:
    """(Ray resources checked, errors) over infra/k8s and what Terraform renders from it."""
    shipped = [(m.name, m.doc) for m in manifests.load(manifests.manifest_files(k8s_dir))]
    renders, errors = rendered(trees, k8s_dir)
    documents = shipped + renders
    return sum(_is_ray(d) for _, d in documents), errors + check(documents, trees)
