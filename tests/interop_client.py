"""Drive a KServe v2 server with the stock `tritonclient` clients (gRPC, or HTTP with --http);
print one JSON report.

Run with the Triton environment's interpreter (scripts/setup_triton_venv.sh), never inside the
test process: tritonclient registers its own `inference.*` protobuf messages, which clash with
protos/. tests/test_interop.py runs it in a subprocess and checks the report; it is not a test
module itself (no `test_` prefix), so pytest does not collect it.

    python tests/interop_client.py --url 127.0.0.1:PORT --model NAME --features-json FILE
    python tests/interop_client.py --url 127.0.0.1:PORT --model NAME --columns-json FILE
    python tests/interop_client.py --http --url 127.0.0.1:PORT --model NAME --features-json FILE
    python tests/interop_client.py --dump-descriptors

--features-json FILE holds a JSON array of rows (floats; NaN allowed as Python's json writes
it); --columns-json FILE an object {"features": rows, "text": {column: [values]}} for a model
with text columns, sent as BYTES tensors from numpy object arrays, as tritonclient users do.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 10.0  # per call; a healthy local server answers in milliseconds
OUTPUTS = ("probability", "label")


def _json_safe(array: np.ndarray) -> list[Any]:
    """Arrays as nested lists; NaN/inf as None so the report is strict JSON."""
    return [
        [None if isinstance(v, float) and not math.isfinite(v) else v for v in row]
        for row in array.tolist()
    ]


def _infer(
    client: grpcclient.InferenceServerClient, model: str, rows: np.ndarray
) -> dict[str, Any]:
    features = grpcclient.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows)  # tritonclient's gRPC client always sends raw bytes
    requested = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    result = client.infer(
        model, [features], outputs=requested, request_id="interop-1", client_timeout=TIMEOUT_S
    )
    response = result.get_response()
    everything = client.infer(model, [features], client_timeout=TIMEOUT_S)  # no outputs: all
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": {
            name: {
                "datatype": result.as_numpy(name).dtype.str,
                "shape": list(result.as_numpy(name).shape),
                "values": _json_safe(result.as_numpy(name)),
            }
            for name in OUTPUTS
        },
        "default_outputs": sorted(out.name for out in everything.get_response().outputs),
    }


def _stream_infer(
    client: grpcclient.InferenceServerClient, model: str, rows: np.ndarray
) -> dict[str, Any]:
    """ModelStreamInfer: one request per row over one stream, answers collected in order."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, row in enumerate(rows):
            features = grpcclient.InferInput("features", [1, rows.shape[1]], "FP32")
            features.set_data_from_numpy(row[None, :])
            client.async_stream_infer(model, [features], request_id=f"stream-{i}")
        probabilities: list[float] = []
        ids: list[str] = []
        for _ in range(len(rows)):
            result, error = answers.get(timeout=TIMEOUT_S)
            if error is not None:
                raise error
            ids.append(result.get_response().id)
            probabilities.append(float(result.as_numpy("probability")[0, 0]))
    finally:
        client.stop_stream()
    return {"ids": ids, "probability": probabilities}


def _error_of(call: Any) -> dict[str, Any]:
    """The status a failing call reports, as tritonclient surfaces it."""
    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return {"status": None, "message": None}


def check(url: str, model: str, rows: np.ndarray) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url=url)
    try:
        t = TIMEOUT_S
        return {
            "server_live": client.is_server_live(client_timeout=t),
            "server_ready": client.is_server_ready(client_timeout=t),
            "model_ready": client.is_model_ready(model, client_timeout=t),
            "server_metadata": client.get_server_metadata(as_json=True, client_timeout=t),
            "model_metadata": client.get_model_metadata(model, as_json=True, client_timeout=t),
            "model_config": client.get_model_config(model, as_json=True, client_timeout=t),
            "infer": _infer(client, model, rows),
            "stream_infer": _stream_infer(client, model, rows),
            # After the inferences above, so the counters have moved.
            "statistics": client.get_inference_statistics(model, as_json=True, client_timeout=t),
            "unknown_model_error": _error_of(
                lambda: client.get_model_metadata("no_such_model", client_timeout=t)
            ),
        }
    finally:
        client.close()


def infer_columns(url: str, model: str, columns: dict[str, Any]) -> dict[str, Any]:
    """One request with the FP32 matrix and each text column as a BYTES [N, 1] tensor."""
    client = grpcclient.InferenceServerClient(url=url)
    try:
        numeric = np.asarray(columns["features"], dtype=np.float32)
        inputs = [grpcclient.InferInput("features", list(numeric.shape), "FP32")]
        inputs[0].set_data_from_numpy(numeric)
        for name, values in columns["text"].items():
            text = np.array([[value] for value in values], dtype=np.object_)
            tensor = grpcclient.InferInput(name, list(text.shape), "BYTES")
            tensor.set_data_from_numpy(text)
            inputs.append(tensor)
        result = client.infer(model, inputs, client_timeout=TIMEOUT_S)
        return {name: _json_safe(result.as_numpy(name)) for name in OUTPUTS}
    finally:
        client.close()


def check_http(url: str, model: str, rows: np.ndarray) -> dict[str, Any]:
    """The same calls through tritonclient.http: JSON and binary tensors, and the extensions."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url, network_timeout=TIMEOUT_S)
    try:
        results = {}
        for binary in (True, False):  # binary tensor data extension, then plain JSON
            features = httpclient.InferInput("features", list(rows.shape), "FP32")
            features.set_data_from_numpy(rows, binary_data=binary)
            requested = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
            result = client.infer(model, [features], outputs=requested, request_id="http-1")
            results["binary" if binary else "json"] = {
                "id": result.get_response()["id"],
                "outputs": {n: _json_safe(result.as_numpy(n)) for n in OUTPUTS},
            }
        everything = client.infer(model, [features])  # no outputs named: all, binary
        return {
            "server_live": client.is_server_live(),
            "server_ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "server_metadata": client.get_server_metadata(),
            "model_metadata": client.get_model_metadata(model),
            "model_config": client.get_model_config(model),
            "infer": results,
            "default_outputs": sorted(o["name"] for o in everything.get_response()["outputs"]),
            "statistics": client.get_inference_statistics(model),
            "index": client.get_model_repository_index(),
            "unknown_model_error": _error_of(lambda: client.get_model_metadata("no_such_model")),
        }
    finally:
        client.close()


def _is_repeated(field: Any) -> bool:
    # `is_repeated` replaces the deprecated `label` in newer protobuf releases.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def dump_descriptors() -> dict[str, Any]:
    """Every field of tritonclient's bundled stubs: {message: {field: [number, type, label]}}."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    fields: dict[str, Any] = {}

    def walk(message: Any) -> None:
        fields[message.full_name] = {
            f.name: [f.number, f.type, "repeated" if _is_repeated(f) else "single"]
            for f in message.fields
        }
        for nested in message.nested_types:
            walk(nested)

    enums: dict[str, Any] = {}
    for module in (model_config_pb2, service_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            enums[enum.full_name] = {v.name: v.number for v in enum.values}
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {
        m.name: [
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        ]
        for m in service.methods
    }
    return {"fields": fields, "enums": enums, "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="HOST:PORT of the gRPC server")
    parser.add_argument("--model", help="model name")
    parser.add_argument("--features-json", help="JSON file with a list of feature rows")
    parser.add_argument("--columns-json", help="JSON file: numeric rows and text columns")
    parser.add_argument("--dump-descriptors", action="store_true", help="print stub fields; exit")
    parser.add_argument("--http", action="store_true", help="tritonclient.http (REST) instead")
    args = parser.parse_args(argv)
    if args.dump_descriptors:
        report = dump_descriptors()
    elif args.columns_json:
        with open(args.columns_json, encoding="utf-8") as file:
            report = infer_columns(args.url, args.model, json.load(file))
    else:
        if not (args.url and args.model and args.features_json):
            parser.error("--url, --model and --features-json are required")
        with open(args.features_json, encoding="utf-8") as file:
            rows = np.asarray(json.load(file), dtype=np.float32)
        report = (check_http if args.http else check)(args.url, args.model, rows)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
