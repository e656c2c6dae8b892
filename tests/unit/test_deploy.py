"""deploy/kubernetes, validated offline and checked against the service it deploys.

Core kinds are validated with kubernetes-validate (Kubernetes' own OpenAPI schemas, strict: unknown
fields fail). The custom resources (Gateway, GRPCRoute, ScaledObject, ServiceMonitor) are validated
under node with the kubernetes-models validators, generated from each project's API types
(`make deploy-tools` installs them). Then the manifests are checked against the code: settings,
health names, metric names, the drain grace and the routing header.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vlm_service.config import load_settings, settings_table
from vlm_service.observability.metrics import Metrics, ModelSnapshot, Snapshot
from vlm_service.server import LIVENESS, model_health_name

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
VALIDATE = ROOT / "deploy" / "validate"
MODEL_HEADER = "x-vlm-model"
CORE_API_VERSIONS = ("v1", "apps/v1", "policy/v1")
# The oldest Kubernetes the base is for (native gRPC probes, the preStop sleep action) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Environment variables the pods set that are not settings: where a read-only root filesystem
# lets Python, Hugging Face and the tiny-checkpoint builds write.
NON_SETTING_ENV = {"HOME", "HF_HOME", "PYTHONDONTWRITEBYTECODE"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for name in kustomization()["resources"] for doc in load(K8S / name)]


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    (doc,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return doc


def run_crd_validator(*files: Path) -> tuple[int, list[dict]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; the custom-resource validators run under node")
    if not (VALIDATE / "node_modules" / ".installed").exists():
        pytest.fail("the custom-resource validators are not installed: run `make deploy-tools`")
    result = subprocess.run(
        [node, str(VALIDATE / "validate.mjs"), *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert not result.stderr.strip() or "ExperimentalWarning" in result.stderr, result.stderr
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_the_kustomization_lists_every_manifest():
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_kinds_match_the_kubernetes_schemas(docs, version):
    core = [doc for doc in docs if doc["apiVersion"] in CORE_API_VERSIONS]
    assert {doc["kind"] for doc in core} == {"Namespace", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_core_schema_validation_rejects_broken_manifests(docs):
    deployment = of_kind(docs, "Deployment")[0]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # a misspelt field
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_custom_resources_match_their_schemas():
    files = sorted(K8S.glob("*.yaml"))
    code, lines = run_crd_validator(*files)
    assert code == 0, [line for line in lines if line.get("error")]
    checked = sorted(line["kind"] for line in lines if line["checked"])
    assert checked == ["GRPCRoute", "Gateway", "ScaledObject", "ScaledObject", "ServiceMonitor"]


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("GRPCRoute", lambda d: d["spec"]["rules"][0]["matches"][0]["headers"][0].update(type="Prefix")),
        ("ScaledObject", lambda d: d["spec"].update(minReplicaCount="two")),
        ("ServiceMonitor", lambda d: d["spec"].update(endpoints={"port": "metrics"})),
        ("Gateway", lambda d: d["spec"]["listeners"][0].pop("protocol")),
    ],
)
def test_the_custom_resource_validators_reject_broken_resources(docs, tmp_path, kind, break_it):
    broken = copy.deepcopy(of_kind(docs, kind)[0])
    break_it(broken)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    code, lines = run_crd_validator(path)
    assert code == 1 and lines[0]["error"], lines


def pod_env(deployment: dict) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


def deployments_by_model(docs) -> dict[str, dict]:
    out = {}
    for deployment in of_kind(docs, "Deployment"):
        models = load_settings(environ=pod_env(deployment)).models
        assert len(models) == 1, f"{deployment['metadata']['name']}: one model per Deployment, got {models}"
        out[models[0].split("=")[0]] = deployment
    return out


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_one_deployment_per_model_with_probes_on_its_health_names(docs):
    by_model = deployments_by_model(docs)
    assert sorted(by_model) == ["qwen2-vl", "smolvlm"]
    for model, deployment in by_model.items():
        settings = load_settings(environ=pod_env(deployment))  # every value is a valid setting
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": settings.port, "service": model_health_name(model)}
        assert container["livenessProbe"]["grpc"] == {"port": settings.port, "service": LIVENESS}
        env_names = {spec.env for spec in settings_table()}
        assert set(pod_env(deployment)) <= env_names | NON_SETTING_ENV
        # Service links would inject <SERVICE>_PORT variables, and a Service named `vlm` sets VLM_PORT.
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_termination_grace_outlasts_the_drain(docs):
    for deployment in of_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        settings = load_settings(environ=pod_env(deployment))
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # preStop, then the drain's grace, then up to 10 s for the workers' last step (Engine.close).
        assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_period + 10


def test_pods_run_as_non_root_on_a_read_only_root_filesystem(docs):
    for deployment in of_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # Everything the service writes is on an emptyDir.
        empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]
        env = pod_env(deployment)
        for path in (env["HOME"], env["HF_HOME"], env["VLM_CACHE_DIR"]):
            assert any(path == w or path.startswith(w + "/") for w in writable), f"{path} is not writable"
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_each_model_has_a_headless_service_a_budget_and_an_autoscaler(docs):
    metrics = Metrics()
    metrics.watch(lambda: Snapshot(models=(ModelSnapshot("m", queued=3, running=1),), open_streams=0))
    exported = {sample.name: sample.labels for family in metrics.registry.collect() for sample in family.samples}
    assert exported["vlm_queue_depth"] == {"model": "m"}

    for model, deployment in deployments_by_model(docs).items():
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
        service = named(docs, "Service", name)
        assert service["spec"]["clusterIP"] == "None" and matches(service["spec"]["selector"], labels)
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"grpc": "grpc", "metrics": "metrics"}
        budget = named(docs, "PodDisruptionBudget", name)
        assert matches(budget["spec"]["selector"]["matchLabels"], labels) and budget["spec"]["maxUnavailable"] == 1
        scaler = named(docs, "ScaledObject", name)
        assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert scaler["spec"]["minReplicaCount"] >= 2  # the budget can always let one go
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert (
            f'vlm_queue_depth{{namespace="{kustomization()["namespace"]}", model="{model}"}}'
            in (trigger["metadata"]["query"])
        )


def test_the_grpc_route_sends_each_model_header_to_its_deployment(docs):
    route = named(docs, "GRPCRoute", "vlm")
    gateway = named(docs, "Gateway", "vlm")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == "vlm" and parent["sectionName"] in [
        listener["name"] for listener in gateway["spec"]["listeners"]
    ]
    by_header, default = {}, []
    for rule in route["spec"]["rules"]:
        (backend,) = rule["backendRefs"]
        if "matches" not in rule:
            default.append(backend["name"])
            continue
        for match in rule["matches"]:
            (header,) = match["headers"]
            assert header["name"] == MODEL_HEADER and header["type"] == "Exact"
            by_header[header["value"]] = backend
    by_model = deployments_by_model(docs)
    assert sorted(by_header) == sorted(by_model)
    for model, backend in by_header.items():
        service = named(docs, "Service", by_model[model]["metadata"]["name"])
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"] == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert default == ["vlm-smolvlm"]  # a call without the header goes to the default model


def test_the_service_monitor_scrapes_every_model_service(docs):
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    for service in of_kind(docs, "Service"):
        assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]


def test_the_nginx_config_routes_the_same_header_and_models(docs):
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "map $http_" + MODEL_HEADER.replace("-", "_") + " $vlm_replicas" in conf
    for model in deployments_by_model(docs):
        assert f"\n        {model} " in conf, f"nginx.conf does not route {model}"
    assert "grpc_pass grpc://$vlm_replicas;" in conf
