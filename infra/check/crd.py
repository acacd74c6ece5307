"""Validate custom resources against the vendored KubeRay CRD schemas, strictly.

An API server with strict field validation rejects a field its structural schema does not declare
(unless the schema says `x-kubernetes-preserve-unknown-fields`), and applies the schema's defaults
before it checks `required`. A plain jsonschema run of `openAPIV3Schema` does neither, so a misspelt
field in a pod template would pass it; `strict_schema` rewrites the Kubernetes extensions into JSON
Schema and `validate` applies defaults first.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# A CRD's root `metadata` is the API server's ObjectMeta, which the CRD leaves out: its fields, strictly
_OBJECT_META = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": _STRING_MAP, "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        **{k: {} for k in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                           "deletionGracePeriodSeconds", "managedFields", "selfLink")},
    },
}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def strict_schema(node: Any) -> Any:
    """The structural schema `node` as strict JSON Schema (Draft 7)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if node.get("type") == "object" and not preserve and "additionalProperties" not in node:
        # declared fields only; an object with no declared fields is an empty one (structural schemas)
        out["additionalProperties"] = False
        out.setdefault("properties", {})
    return out


def apply_defaults(schema: dict, instance: Any) -> Any:
    """Fills in the schema's defaults where the instance leaves a field out, as the API server does before
    it validates (so a field that is both required and defaulted may be omitted)."""
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                apply_defaults(sub, instance[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in schema.get("properties", {}):
                    apply_defaults(extra, value)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            apply_defaults(schema["items"], item)
    return instance


@cache
def _crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict schema of that version of a vendored CRD."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            strict = strict_schema(schema)
            strict["properties"]["metadata"] = _OBJECT_META
            out[(f"{group}/{version['name']}", kind)] = {"raw": schema, "strict": strict}
    return out


def known_kinds() -> set[tuple[str, str]]:
    return set(_crds())


def validate(doc: dict) -> list[str]:
    """Errors of one custom resource (empty when it is valid), each naming the path of the bad field."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in _crds():
        return [f"no vendored CRD schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    errors = _metadata_errors(doc.get("metadata"))
    schema = _crds()[key]
    instance = apply_defaults(schema["raw"], copy.deepcopy(doc))
    validator = jsonschema.Draft7Validator(schema["strict"])
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        errors.append(f"{where}: {error.message}")
    return errors


def _metadata_errors(metadata: Any) -> list[str]:
    # CRD schemas leave metadata to the API server; check what it would
    if not isinstance(metadata, dict):
        return ["metadata: required"]
    name = metadata.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [f"metadata.name: {name!r} is not a DNS subdomain name"]
    return []
