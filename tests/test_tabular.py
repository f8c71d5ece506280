"""Real tabular data served (issue 13): palmerpenguins' CSV (text categories, missing cells) from
`stablemlp train --csv` to gRPC replies, columns by name, through our client, its CLI, tritonclient
and perf_analyzer; unseen and missing categories never fail; bad text gets INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ServerProcess
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving import client
from stablemlp.serving.client import cli as predict_cli
from stablemlp.serving.client.columns import MISSING

pytest.importorskip("palmerpenguins")
StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
MODEL = "penguins"
TEXT = ("species", "island")
NUMERIC = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year")
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def penguins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the CSV without missing targets, a repository with the model trained on it)."""
    from stablemlp.bench.quality import penguins_csv
    from stablemlp.export.cli import export_main
    from stablemlp.model.cli import main as train_main

    folder = tmp_path_factory.mktemp("penguins")
    path, run, repository = penguins_csv(folder), folder / "run", folder / "repo"
    args = ["--csv", str(path), "--target", "sex", "--epochs", "40", "--no-progress"]
    assert train_main([*args, "--output", str(run)]) == 0
    assert export_main([str(run), "--repository", str(repository)]) == 0
    return path, repository


@pytest.fixture(scope="module")
def server(penguins: tuple[Path, Path], start_server: StartServer) -> Iterator[ServerProcess]:
    with start_server(penguins[1]) as running:
        yield running


def records(path: Path) -> list[dict[str, Any]]:
    """The CSV's rows, plus rows a client may really send: an unseen island, missing text
    (empty, NA, None), spaces around values, a missing number."""
    with path.open(newline="") as stream:
        rows: list[dict[str, Any]] = list(csv.DictReader(stream))[:60]
    odd = [
        {"island": "Atlantis"}, {"species": ""}, {"species": "NA"}, {"island": None},
        {"species": "  Gentoo  "}, {"bill_length_mm": ""}, {"body_mass_g": None},
    ]  # fmt: skip
    return rows + [{**rows[i], **change} for i, change in enumerate(odd)]


def expected(repository: Path, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """In-process ONNX Runtime on the raw columns, missing values written as the model expects
    them: NaN numbers, "" text (the codec strips spaces)."""

    def num(v: Any) -> float:
        return math.nan if v is None or str(v).strip().lower() in MISSING else float(v)

    def txt(v: Any) -> str:
        return "" if v is None or str(v).strip().lower() in MISSING else str(v).strip()

    session = ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds: dict[str, np.ndarray] = {
        "features": np.array([[num(r[c]) for c in NUMERIC] for r in rows], dtype=np.float32)
    }
    for column in TEXT:
        feeds[column] = np.array([[txt(r[column])] for r in rows], dtype=object)
    probability, label = session.run(["probability", "label"], feeds)
    return probability[:, 0], label[:, 0]


def test_metadata_and_config_describe_the_columns(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=TIMEOUT)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=TIMEOUT).config
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("features", "FP32", [-1, len(NUMERIC)]), ("species", "BYTES", [-1, 1]),
        ("island", "BYTES", [-1, 1]),
    ]  # fmt: skip
    assert json.loads(config.parameters["feature_names"].string_value) == list(NUMERIC)
    assert json.loads(config.parameters["text_columns"].string_value) == list(TEXT)
    assert [i.data_type for i in config.input][1:] == [13, 13]  # TYPE_STRING


@pytest.mark.parametrize("stream", [False, True])
def test_records_by_name_unseen_and_missing_categories(
    server: ServerProcess, penguins: tuple[Path, Path], stream: bool
) -> None:
    rows = records(penguins[0])
    results = client.predict(server.address, rows, model=MODEL, stream=stream)
    probability, label = expected(penguins[1], rows)
    np.testing.assert_allclose([p for p, _ in results], probability, atol=PROBABILITY, rtol=0)
    np.testing.assert_array_equal([lab for _, lab in results], label)


def test_a_dataframe_works_as_records(server: ServerProcess, penguins: tuple[Path, Path]) -> None:
    import pandas as pd

    frame = pd.read_csv(penguins[0]).head(20)  # NaN cells, columns in the file's order
    from_frame = client.predict(server.address, frame, model=MODEL)
    from_records = client.predict(server.address, records(penguins[0])[:20], model=MODEL)
    np.testing.assert_allclose(from_frame, from_records, atol=PROBABILITY)


def test_predict_csv_by_header_any_order_and_missing_columns_named(
    server: ServerProcess,
    penguins: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = records(penguins[0])
    order = ["note", *reversed(NUMERIC), "island", "sex", "species"]  # extra columns too
    path = tmp_path / "score.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(order)
        for row in rows:
            writer.writerow(["x", *(("" if row.get(c) is None else row[c]) for c in order[1:])])
    assert predict_cli.main(["--server", server.address, "--csv", str(path)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()[1:]
    probability, label = expected(penguins[1], rows)
    assert [line.split(",")[2] for line in lines] == [str(v) for v in label]
    np.testing.assert_allclose(
        [float(line.split(",")[1]) for line in lines], probability, atol=PROBABILITY
    )
    assert f"{len(rows)} rows in" in out.err and "rows/s" in out.err
    (tmp_path / "short.csv").write_text("species,bill_depth_mm\nAdelie,18\n")
    assert predict_cli.main(["--server", server.address, "--csv", str(tmp_path / "short.csv")]) == 1
    err = capsys.readouterr().err
    assert "header lacks the model's columns" in err and "'island'" in err


def test_a_large_file_goes_over_one_stream(
    model_repository: Path, start_server: StartServer, tmp_path: Path,
    test_split: Any, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    rows = np.tile(test_split.features, (30, 1))  # > one request of 64 rows
    path = tmp_path / "many.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(test_split.feature_names)
        writer.writerows([["" if math.isnan(v) else repr(float(v)) for v in row] for row in rows])
    with start_server(model_repository, "--max-batch-size", "64") as srv:
        assert predict_cli.main(["--server", srv.address, "--csv", str(path)]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == len(rows) + 1 and "one stream" in out.err
    labels = [int(line.rsplit(",", 1)[1]) for line in out.out.splitlines()[1:]]
    assert labels == np.tile(test_split.label[:, 0], 30).tolist()


def _raw_text(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _request(island: list[bytes] | None = None, raw_island: bytes | None = None) -> Any:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="features", datatype="FP32", shape=[2, len(NUMERIC)])
    request.raw_input_contents.append(np.zeros((2, len(NUMERIC)), "<f4").tobytes())
    request.inputs.add(name="species", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(_raw_text([b"Adelie", b"Gentoo"]))
    request.inputs.add(name="island", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(raw_island or _raw_text(island or [b"Dream", b"Biscoe"]))
    return request


BAD_TEXT = [
    ("not UTF-8", _request([b"Dream", b"\xff\xfe"]), "input 'island' row 1", "UTF-8"),
    ("prefix past the end", _request(raw_island=_raw_text([b"Dream"]) + b"\x01"), "element 1",
     "past the end"),
    ("length past the end", _request(raw_island=b"\x09\x00\x00\x00ab"), "element 0", "runs past"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_", "where", "what"), BAD_TEXT,
                         ids=[c[0] for c in BAD_TEXT])  # fmt: skip
def test_bad_text_gets_invalid_argument_naming_input_and_row(
    server: ServerProcess, case: str, request_: Any, where: str, what: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request_, timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert where in raised.value.details() and what in raised.value.details()
        missing = _request()
        del missing.inputs[2]
        del missing.raw_input_contents[2]
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(missing, timeout=TIMEOUT)
        assert "missing 'island'" in raised.value.details()
        assert stub.ModelInfer(_request(), timeout=TIMEOUT).outputs  # and it serves on


def test_huge_finite_inputs_give_a_finite_probability(server: ServerProcess) -> None:
    """Issue 12.10: the graph bounds standardized inputs, so 3.4e38 scores, never NaN."""
    request = _request()
    huge = np.full((2, len(NUMERIC)), 3.4e38, "<f4")
    huge[1] = -3.4e38
    request.raw_input_contents[0] = huge.tobytes()
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    probability = np.frombuffer(reply.raw_output_contents[0], "<f4")
    assert np.isfinite(probability).all() and ((probability >= 0) & (probability <= 1)).all()


def _triton_python() -> Path:
    from test_interop import PERF_ANALYZER, TRITON_PYTHON

    if not (TRITON_PYTHON.exists() and PERF_ANALYZER.exists()):
        pytest.skip("no Triton client environment (scripts/setup_triton_venv.sh)")
    return TRITON_PYTHON


@pytest.mark.slow
def test_tritonclient_sends_text_columns_as_object_arrays(
    server: ServerProcess, penguins: tuple[Path, Path], tmp_path: Path
) -> None:
    from test_interop import _client

    _triton_python()
    rows = records(penguins[0])
    columns = {
        "features": [[float(r[c]) if r[c] not in (None, "", "NA") else None for c in NUMERIC]
                     for r in rows],
        "text": {c: ["" if r[c] is None else str(r[c]).strip() for r in rows] for c in TEXT},
    }  # fmt: skip
    path = tmp_path / "columns.json"
    path.write_text(json.dumps(columns).replace("null", "NaN"))
    report = _client("--url", server.address, "--model", MODEL, "--columns-json", str(path))
    probability, label = expected(penguins[1], rows)
    np.testing.assert_allclose(np.array(report["probability"])[:, 0], probability, atol=PROBABILITY)
    np.testing.assert_array_equal(np.array(report["label"])[:, 0], label)


@pytest.mark.slow
def test_perf_analyzer_generates_text_for_the_model(server: ServerProcess, tmp_path: Path) -> None:
    from test_interop import PERF_ANALYZER, PERF_TIMEOUT_S, _run

    _triton_python()
    report = tmp_path / "perf.csv"
    done = _run(
        [str(PERF_ANALYZER), "-m", MODEL, "-u", server.address, "-i", "grpc", "-b", "4",
         "--concurrency-range", "2", "-p", "300", "-s", "100", "-r", "10", "-f", str(report)],
        PERF_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with report.open(newline="") as stream:
        assert float(next(csv.DictReader(stream))["Inferences/Second"]) > 0
