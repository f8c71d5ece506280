"""serving/: settings, runtime, repository in-process; then real servers via real gRPC clients."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import (
    MODEL_NAME,
    HeldOutSplit,
    ServerProcess,
    cpu_repository,
    infer_request,
    outputs,
    wait_until_serving,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.protos import model_config_pb2 as mc
from stablemlp.serving import client
from stablemlp.serving import server as server_module
from stablemlp.serving.client import cli as predict_cli
from stablemlp.serving.errors import (
    INTERNAL_MESSAGE,
    STATUS,
    ContractError,
    IntegrityError,
    ModelNotFoundError,
    ServingError,
)
from stablemlp.serving.grpc.boundary import GRPC_CODES
from stablemlp.serving.observe.call_log import failure
from stablemlp.serving.repository.models import ModelRepository
from stablemlp.serving.runtime.session import CUDA, ModelRuntime, RuntimeOptions
from stablemlp.serving.settings import Settings, VersionPolicy, load_settings

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
CPU_OPTIONS = RuntimeOptions(device="cpu", intra_op_threads=1, inter_op_threads=1)
TIMEOUT = 10.0

# ---------------------------------------------------------------- settings


def test_flags_override_env_which_overrides_defaults() -> None:
    env = {
        "STABLEMLP_MODEL_REPOSITORY": "/models",
        "STABLEMLP_PORT": "9000",
        "STABLEMLP_DEVICE": "auto",
    }
    settings = load_settings({"port": 7000}, env)
    assert settings.model_repository == Path("/models")
    assert (settings.port, settings.device, settings.max_batch_size) == (7000, "auto", 1024)
    assert load_settings({}, env).port == 9000


def test_settings_parse_policies_models_and_refuse_bad_values() -> None:
    env = {"STABLEMLP_MODELS": "a, b", "STABLEMLP_VERSION_POLICY": "specific:3,1"}
    settings = load_settings({"model_repository": Path("r")}, env)
    assert settings.models == ("a", "b")
    assert settings.version_policy == VersionPolicy("specific", versions=(1, 3))
    with pytest.raises(ValueError, match="STABLEMLP_PORT='x'"):
        load_settings({"model_repository": Path("r")}, {"STABLEMLP_PORT": "x"})
    with pytest.raises(ValueError, match="--model-repository or STABLEMLP_MODEL_REPOSITORY"):
        load_settings({}, {})
    with pytest.raises(ValueError, match="device: got 'tpu'"):
        Settings(Path("r"), device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version policy 'newest'"):
        VersionPolicy.parse("newest")


def test_version_policies_select_like_triton() -> None:
    assert VersionPolicy.parse("latest").select([1, 3, 2]) == [3]
    assert VersionPolicy.parse("latest:2").select([1, 3, 2]) == [3, 2]
    assert VersionPolicy.parse("all").select([1, 3, 2]) == [3, 2, 1]
    assert VersionPolicy.parse("specific:1,2").select([1, 3]) == [1]


def test_serve_help_lists_every_setting_with_its_env_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        server_module.main(["--help"])
    text = capsys.readouterr().out
    for name in Settings.__dataclass_fields__:
        assert f"STABLEMLP_{name.upper()}" in text


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, stablemlp.serving.server, stablemlp.serving.client.calls, stablemlp.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- runtime and repository


@pytest.fixture
def repo_copy(model_repository: Path, tmp_path: Path) -> Path:
    """A writable copy of the session repository."""
    return Path(shutil.copytree(model_repository, tmp_path / "repo"))


def test_runtime_verifies_sha256_before_loading(repo_copy: Path) -> None:
    version = repo_copy / MODEL_NAME / "1"
    with (version / "model.onnx").open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(IntegrityError, match=r"got sha256 .* expected .* from manifest\.json"):
        ModelRuntime(version, CPU_OPTIONS)


def test_runtime_refuses_a_manifest_breaking_the_contract(repo_copy: Path) -> None:
    manifest_path = repo_copy / MODEL_NAME / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["feature_names"] = manifest["feature_names"][:-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match=r"FP32 tensor has 30 columns, .* feature name \(29\)"):
        ModelRuntime(repo_copy / MODEL_NAME / "1", CPU_OPTIONS)
    del manifest["threshold"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match=r"manifest.json: 'threshold': missing"):
        ModelRuntime(repo_copy / MODEL_NAME / "1", CPU_OPTIONS)


def test_runtime_refuses_a_manifest_threshold_the_graph_does_not_use(repo_copy: Path) -> None:
    """Issue 23.9: a manifest whose threshold disagrees with the graph's was served."""
    manifest_path = repo_copy / MODEL_NAME / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["threshold"] = 0.3
    manifest_path.write_text(json.dumps(manifest))
    expected = r"'threshold': got 0.3, expected 0.5 \(the threshold inside model.onnx\)"
    with pytest.raises(ContractError, match=expected):
        ModelRuntime(repo_copy / MODEL_NAME / "1", CPU_OPTIONS)


def test_runtime_matches_in_process_onnxruntime(
    model_repository: Path, test_split: HeldOutSplit
) -> None:
    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", CPU_OPTIONS)
    runtime.warm_up(runs=1)
    results = runtime.run({"features": test_split.features}, ["probability", "label"])
    np.testing.assert_array_equal(results["probability"], test_split.probability)
    np.testing.assert_array_equal(results["label"], test_split.label)
    assert runtime.providers == ("CPUExecutionProvider",)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_device_cuda_refuses_what_onnxruntime_only_warns_about(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA is available here: the refusal cannot happen")
    argv = ["--model-repository", str(model_repository), "--port", "0", "--device", "cuda"]
    assert server_module.main(argv) == 1
    message = capsys.readouterr().err
    assert "cannot start" in message and "device cuda" in message
    assert "expected CUDAExecutionProvider first" in message and "onnxruntime-gpu" in message


def test_a_taken_port_is_refused_not_shared(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--model-repository", str(model_repository), "--host", "127.0.0.1"]
        assert server_module.main([*argv, "--port", str(port), "--warmup-runs", "0"]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_device_auto_falls_back_to_cpu_with_a_warning(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA is available here: no fallback")
    auto = RuntimeOptions(device="auto", intra_op_threads=1, inter_op_threads=1)
    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", auto)
    assert runtime.providers == ("CPUExecutionProvider",)
    assert "device auto: falling back to CPU" in caplog.text


def _repository(root: Path, policy: str = "latest:1") -> ModelRepository:
    repository: ModelRepository = cpu_repository(root, policy)
    return repository


def _add_version(root: Path, version: int) -> None:
    shutil.copytree(root / MODEL_NAME / "1", root / MODEL_NAME / str(version))


def test_repository_policies_ignore_non_version_folders(repo_copy: Path) -> None:
    _add_version(repo_copy, 2)
    _add_version(repo_copy, 10)
    (repo_copy / MODEL_NAME / "007").mkdir()  # not written plainly: ignored
    (repo_copy / MODEL_NAME / ".tmp-3").mkdir()
    repository = _repository(repo_copy, "all")
    repository.load_all()
    assert sorted(repository.entries(MODEL_NAME)) == [1, 2, 10]
    assert repository.get(MODEL_NAME).version == 10
    latest = _repository(repo_copy, "specific:2")
    latest.load_all()
    assert latest.get(MODEL_NAME, "2").version == 2
    with pytest.raises(ModelNotFoundError, match=r"version: got '1', expected one of \[2\]"):
        latest.get(MODEL_NAME, "1")


# ---------------------------------------------------------------- errors


def test_every_domain_error_has_a_status_and_unknown_ones_are_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def leaves(cls: type[ServingError]) -> list[type[ServingError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in leaves(sub))]

    mapped = tuple(cls for cls, _ in STATUS)
    assert all(issubclass(cls, mapped) for cls in leaves(ServingError)[1:])
    assert all(name in GRPC_CODES for _, name in STATUS)  # every status has its gRPC code
    try:
        raise KeyError("secret detail")
    except KeyError as err:
        status, message = failure(err, "ModelInfer")
    assert (GRPC_CODES[status], message) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "secret detail" not in message and "Traceback" in caplog.text


# ---------------------------------------------------------------- the served API


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "contents"])
def test_served_predictions_equal_in_process_onnxruntime(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit, raw: bool
) -> None:
    response = stub.ModelInfer(infer_request(test_split.features, raw, id="q7"), timeout=TIMEOUT)
    assert (response.model_name, response.model_version, response.id) == (MODEL_NAME, "1", "q7")
    assert bool(response.raw_output_contents) is raw
    served = outputs(response)
    np.testing.assert_array_equal(served["probability"], test_split.probability)
    np.testing.assert_array_equal(served["label"], test_split.label)


def test_requested_output_subset(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    request = infer_request(test_split.features[:5])
    request.outputs.add(name="label")
    response = stub.ModelInfer(request, timeout=TIMEOUT)
    assert [t.name for t in response.outputs] == ["label"]
    np.testing.assert_array_equal(outputs(response)["label"], test_split.label[:5])


def _edited(rows: np.ndarray, raw: bool = True, **changes: object) -> pb.ModelInferRequest:
    """A valid request for `rows`, then edited: model_name, name, datatype, shape, payload..."""
    request = infer_request(rows, raw)
    tensor = request.inputs[0]
    if "model_name" in changes:
        request.model_name = str(changes["model_name"])
    if "name" in changes:
        tensor.name = str(changes["name"])
    if "datatype" in changes:
        tensor.datatype = str(changes["datatype"])
    if "shape" in changes:
        del tensor.shape[:]
        tensor.shape.extend(changes["shape"])  # type: ignore[call-overload]
    if "payload" in changes:
        request.raw_input_contents[0] = changes["payload"]  # type: ignore[assignment]
    if changes.get("drop"):
        tensor.contents.fp32_contents.pop()
    if "output" in changes:
        request.outputs.add(name=str(changes["output"]))
    return request


def _invalid_cases(
    rows: np.ndarray,
) -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    bad, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    infinite = rows.copy()
    infinite[1, 4] = -np.inf
    both = infer_request(rows)
    both.inputs[0].contents.fp32_contents.extend(rows.ravel().tolist())
    return [
        ("inf", infer_request(infinite), bad, "value at index [1, 4]: got -inf"),
        ("name", _edited(rows, name="x"), bad, "inputs[0].name: got 'x', expected 'features'"),
        ("datatype", _edited(rows, datatype="FP16"), bad, "datatype: got 'FP16', expected 'FP32'"),
        ("rank", _edited(rows, shape=[rows.size]), bad, "got [60] (rank 1), expected rank 2"),
        ("features", infer_request(rows[:, :29]), bad, "shape[1]: got 29, expected 30"),
        ("bytes", _edited(rows, payload=b"\0" * 8), bad, "got 8 bytes, expected 240"),
        ("elements", _edited(rows, raw=False, drop=True), bad, "got 59 elements, expected 60"),
        ("both", both, bad, "both contents.fp32_contents and raw_input_contents"),
        ("empty", infer_request(rows[:0]), bad, "(batch size): got 0, expected 1..1024"),
        (
            "limit",
            infer_request(np.zeros((1025, 30), np.float32)),
            bad,
            "got 1025, expected 1..1024",
        ),
        ("output", _edited(rows, output="score"), bad, "outputs[0].name: got 'score'"),
        ("model", _edited(rows, model_name="nope"), missing, "model 'nope': not found"),
        (
            "version",
            infer_request(rows, model_version="9"),
            missing,
            "got '9', expected one of [1]",
        ),
    ]


def test_each_invalid_request_gets_its_code_and_the_server_keeps_serving(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:2]
    for case, request, code, fragment in _invalid_cases(rows):
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, timeout=TIMEOUT)
            pytest.fail(f"{case}: no error")
        assert raised.value.code() == code, case
        assert fragment in raised.value.details(), (case, raised.value.details())
        response = stub.ModelInfer(infer_request(rows), timeout=TIMEOUT)
        np.testing.assert_array_equal(outputs(response)["label"], test_split.label[:2])


def test_stream_answers_every_request_and_survives_errors(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:3]
    requests = [
        infer_request(rows, id="a"),
        infer_request(rows[:, :5], id="b"),
        infer_request(rows, raw=False, id="c"),
    ]
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT))
    assert len(replies) == 3
    assert replies[0].infer_response.id == "a" and not replies[0].error_message
    assert "shape[1]: got 5, expected 30" in replies[1].error_message
    assert replies[2].infer_response.id == "c"
    np.testing.assert_allclose(
        outputs(replies[2].infer_response)["probability"],
        test_split.probability[:3],
        rtol=0,
        atol=PROBABILITY,
    )


def test_health_liveness_readiness_and_reflection(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", MODEL_NAME, "inference.GRPCInferenceService"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=TIMEOUT).status == serving
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)


def test_server_and_model_metadata(
    stub: pb_grpc.GRPCInferenceServiceStub, server: ServerProcess
) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=TIMEOUT).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=TIMEOUT).ready
    server_meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert server_meta.name == "stablemlp"
    assert {"model_repository", "model_configuration", "statistics"} <= set(server_meta.extensions)
    if CUDA not in ort.get_available_providers():  # --device auto fell back, and said so
        assert "providers=CPUExecutionProvider" in server_meta.extensions
        assert "device auto: falling back to CPU" in server.log()
    assert "READY on CPUExecutionProvider" in server.log()  # providers in the startup log
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=TIMEOUT)
    assert (meta.name, list(meta.versions), meta.platform) == (
        MODEL_NAME,
        ["1"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("features", "FP32", [-1, 30])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probability", "FP32", [-1, 1]),
        ("label", "INT64", [-1, 1]),
    ]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_config_in_triton_shape(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL_NAME), timeout=TIMEOUT).config
    assert (config.name, config.platform, config.backend) == (
        MODEL_NAME,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 1024
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("features", mc.TYPE_FP32, [30])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probability", mc.TYPE_FP32, [1]),
        ("label", mc.TYPE_INT64, [1]),
    ]
    assert config.version_policy.latest.num_versions == 1
    assert config.instance_group[0].kind in (
        mc.ModelInstanceGroup.KIND_CPU,
        mc.ModelInstanceGroup.KIND_GPU,
    )
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["providers"].split(",")[-1] == "CPUExecutionProvider"
    assert tuple(json.loads(parameters["feature_names"])) == test_split.feature_names
    assert 0.0 < float(parameters["threshold"]) < 1.0


def test_model_statistics_count_per_version(
    stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    def stats() -> pb.ModelStatistics:
        request = pb.ModelStatisticsRequest(name=MODEL_NAME, version="1")
        (only,) = stub.ModelStatistics(request, timeout=TIMEOUT).model_stats
        return only

    before = stats()
    stub.ModelInfer(infer_request(test_split.features[:7]), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(test_split.features[:7, :3]), timeout=TIMEOUT)
    after = stats()
    assert (after.name, after.version) == (MODEL_NAME, "1")
    assert after.inference_count - before.inference_count == 7
    assert after.execution_count - before.execution_count == 1
    infer = after.inference_stats
    assert infer.success.count - before.inference_stats.success.count == 1
    assert infer.fail.count - before.inference_stats.fail.count == 1
    assert infer.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert infer.queue.count == infer.compute_input.count == infer.success.count
    assert after.last_inference > 0
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=TIMEOUT).model_stats
    assert [(s.name, s.version) for s in everything] == [(MODEL_NAME, "1")]


def test_repository_index_lists_ready_versions(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=TIMEOUT)
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL_NAME, "1", "READY")]


def test_eight_threads_of_two_hundred_requests_all_correct(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(200):
                index = rng.choice(len(test_split.features), size=int(rng.integers(1, 9)))
                response = stub.ModelInfer(
                    infer_request(test_split.features[index]), timeout=TIMEOUT
                )
                out = outputs(response)
                # The reference ran these rows in another batch: the last bits may differ.
                want = test_split.probability[index]
                if not (
                    np.allclose(out["probability"], want, rtol=0, atol=PROBABILITY)
                    and np.array_equal(out["label"], test_split.label[index])
                ):
                    failures.append(f"thread {seed}: rows {index.tolist()}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


# ---------------------------------------------------------------- the client


def test_predict_function_and_cli(
    server: ServerProcess,
    test_split: HeldOutSplit,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = test_split.features[:4]
    results = client.predict(server.address, rows, model=MODEL_NAME)
    assert [label for _, label in results] == test_split.label[:4, 0].tolist()
    assert np.allclose(
        [p for p, _ in results], test_split.probability[:4, 0], rtol=0, atol=PROBABILITY
    )
    assert client.predict(server.address, rows.tolist()) == results  # the only model is picked

    features = ",".join("" if math.isnan(v) else repr(float(v)) for v in rows[0])
    assert predict_cli.main(["--server", server.address, "--features", features]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "row,probability,label"
    row, probability, label = out[1].split(",")
    assert row == "0" and label == str(test_split.label[0, 0])
    # Printed to 6 decimals: within their rounding of the reference (plus the tolerance).
    assert abs(float(probability) - test_split.probability[0, 0]) <= 5e-7 + PROBABILITY

    names = list(test_split.feature_names)
    csv_path = tmp_path / "rows.csv"
    lines = [",".join(["target", *reversed(names)])]  # extra column, another order
    lines += [
        ",".join(["1", *("" if math.isnan(v) else repr(float(v)) for v in row[::-1])])
        for row in rows
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    argv = ["--server", server.address, "--csv", str(csv_path), "--model", MODEL_NAME]
    assert predict_cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        f"{i},{test_split.probability[i, 0]:.6f},{test_split.label[i, 0]}" for i in range(4)
    ]


def test_predict_cli_reports_server_errors(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server.address, "--features", "1,2,3", "--model", MODEL_NAME]
    assert predict_cli.main(argv) == 1
    assert "expected [N, 30]" in capsys.readouterr().err
    assert predict_cli.main(["--server", server.address, "--features", "1", "--model", "nope"]) == 1
    assert "NOT_FOUND: model 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------- load, unload, shutdown


def test_load_unload_swap_and_graceful_shutdown(
    repo_copy: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:3]
    control = (("authorization", "Bearer control-secret"),)
    with (
        start_server(
            repo_copy, "--grace-period-s", "2", "--model-control-mode", "explicit",
            env={"STABLEMLP_CONTROL_TOKEN": "control-secret"},
        ) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):  # fmt: skip
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name=MODEL_NAME)

        _add_version(repo_copy, 2)  # a new version appears; a load rescans and swaps to it
        stub.RepositoryModelLoad(load, timeout=60, metadata=control)
        assert stub.ModelInfer(infer_request(rows), timeout=TIMEOUT).model_version == "2"
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
        assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL_NAME, "2", "READY")]

        _add_version(repo_copy, 3)  # a damaged version is refused, and version 2 keeps serving
        with (repo_copy / MODEL_NAME / "3" / "model.onnx").open("ab") as stream:
            stream.write(b"\0")
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryModelLoad(load, timeout=60, metadata=control)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 3" in raised.value.details() and "sha256" in raised.value.details()
        assert stub.ModelInfer(infer_request(rows), timeout=TIMEOUT).model_version == "2"
        shutil.rmtree(repo_copy / MODEL_NAME / "3")

        stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME), timeout=TIMEOUT,
            metadata=control,
        )  # fmt: skip
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=TIMEOUT).ready
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer_request(rows), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'breast_cancer' version 2: UNAVAILABLE (unloaded)" in raised.value.details()
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=MODEL_NAME), timeout=TIMEOUT).status
            == not_serving
        )
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
        assert [(m.version, m.state, m.reason) for m in index.models] == [
            ("2", "UNAVAILABLE", "unloaded")
        ]
        assert not stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=True), timeout=TIMEOUT
        ).models

        stub.RepositoryModelLoad(load, timeout=60, metadata=control)
        wait_until_serving(srv.address, deadline_s=TIMEOUT, service=MODEL_NAME)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="nope"), timeout=TIMEOUT,
                metadata=control,
            )  # fmt: skip
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

        # Shutdown: a health watcher sees NOT_SERVING before the server goes, then exit code 0.
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        srv.process.send_signal(signal.SIGINT)  # like Ctrl-C
        assert next(watch).status == not_serving
        assert srv.stop() == 0
    log = srv.log()
    assert log.index("shutting down: NOT_SERVING") < log.index("stopped")


@pytest.mark.cuda
def test_cuda_serving_matches_cpu(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    if CUDA not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime build")
    with start_server(model_repository, "--device", "cuda") as srv:
        results = client.predict(srv.address, test_split.features, model=MODEL_NAME)
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(
                pb.ModelConfigRequest(name=MODEL_NAME), timeout=TIMEOUT
            ).config
    assert config.parameters["providers"].string_value.startswith(CUDA)
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    probability = np.array([p for p, _ in results], dtype=np.float32)
    np.testing.assert_allclose(probability, test_split.probability[:, 0], atol=PROBABILITY, rtol=0)


def test_served_outputs_match_the_torch_model_computed_independently(
    server: ServerProcess, run_dir: Path, test_split: HeldOutSplit
) -> None:
    """Not ONNX against ONNX: the eval-mode torch classifier rebuilt from the checkpoint (BatchNorm
    unfolded, preprocessing in torch) gives what the server answers, labels from the threshold."""
    import torch

    from stablemlp.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    with torch.no_grad():
        expected, _ = checkpoint.build_classifier()(torch.from_numpy(test_split.features))
    expected = expected.numpy()
    results = client.predict(server.address, test_split.features, model=MODEL_NAME)
    probability = np.array([[p] for p, _ in results], dtype=np.float32)
    label = np.array([[lab] for _, lab in results])
    np.testing.assert_allclose(probability, expected, atol=PROBABILITY, rtol=0)
    decided = np.abs(expected - checkpoint.threshold) > 1e-5  # rows not on the threshold itself
    assert decided.all() or decided.mean() > 0.9
    np.testing.assert_array_equal(label[decided], (expected >= checkpoint.threshold)[decided])
    assert 0 < label.sum() < len(label)  # both classes occur: the comparison means something


@pytest.mark.parametrize(("choice", "loop"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_event_loop_is_uvloop_unless_asked_otherwise(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit,
    choice: str, loop: str,
) -> None:  # fmt: skip
    with start_server(model_repository, "--event-loop", choice) as srv:
        results = client.predict(srv.address, test_split.features[:3], model=MODEL_NAME)
        assert [label for _, label in results] == test_split.label[:3, 0].tolist()
    assert f"event loop: {loop}" in srv.log()
