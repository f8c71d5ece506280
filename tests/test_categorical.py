"""Text columns end to end: typed CSV -> train -> export -> ONNX Runtime, TorchScript on raw text.

One generated CSV holds what real files hold: an id column (dropped), numbers with missing markers
and spaces, a text column with spaces around values, missing markers and a rare category, a
high-cardinality text column, an integer column forced categorical, and a text target. It is
trained once and exported once per module.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_isolated
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import PROBABILITY

from stablemlp.export.cli import export_main, verify_main
from stablemlp.export.documents import config_pbtxt
from stablemlp.export.formats import ML_DOMAIN, ML_OPSET, OPSET, check_onnx, op_types
from stablemlp.export.front import lookup_nodes
from stablemlp.export.rows import EXTREMES
from stablemlp.model.categories import MISSING_MARKERS, CategoricalColumn, learn_column
from stablemlp.model.checkpoint import load_checkpoint
from stablemlp.model.cli import main as train_main
from stablemlp.model.encoding import CategoryEncoder, EncoderConfig, TabularNet, fill_unseen_codes
from stablemlp.model.lookup import TextLookup
from stablemlp.model.network import MLPConfig, StabilizedMLP
from stablemlp.protos import model_config_pb2
from stablemlp.serving.manifest import Manifest

COLORS = {"red": 1.5, "green": -1.0, "blue": 0.3, "yellow": 0.0}
ZIPS = {"10115": 0.0, "20095": -0.5, "80331": 1.0}
TEXT = ("color", "city", "zip")


def write_mixed_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "x1", " x2 ", "color", "city", "zip", "outcome"])
        for i in range(rows):
            x1, x2 = rng.normal(), rng.normal() * 10 + 50
            color = str(rng.choice(list(COLORS)))
            city, zip_code = f"city{rng.integers(30)}", str(rng.choice(list(ZIPS)))
            logit = 1.5 * x1 + 0.05 * (x2 - 50) + COLORS[color] + ZIPS[zip_code]
            outcome = "yes" if rng.random() < 1 / (1 + np.exp(-logit)) else "no"
            cell = f"  {color} " if i % 5 == 0 else color  # spaces, as in many public CSVs
            if i % 13 == 0:
                cell = ["", "NA", " ? ", "null", "None", "nan"][i % 6]
            if i in (3, 7, 11):
                cell = "purple"  # rare: fewer rows than the threshold
            x1_cell = " NA " if i % 17 == 0 else f"{x1:.4f}"
            writer.writerow([i, x1_cell, f"{x2:.3f}", cell, city, zip_code, outcome])
    return path


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("mixed")
    path = write_mixed_csv(folder / "mixed.csv")
    run = folder / "run"
    args = ["--csv", str(path), "--target", "outcome", "--drop", "id", "--categorical", "zip"]
    args += ["--max-categories", "8", "--epochs", "30", "--no-progress", "--output", str(run)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train_main(args) == 0
    return run, printed.getvalue()


@pytest.fixture(scope="module")
def mixed_repository(mixed_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("repo")
    assert export_main([str(mixed_run[0]), "--repository", str(repository)]) == 0
    return repository


def _session(repository: Path) -> ort.InferenceSession:
    path = repository / "mixed" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(rows: list[tuple[float, float, str, str, str]]) -> dict[str, np.ndarray]:
    features = np.array([[r[0], r[1]] for r in rows], dtype=np.float32)
    text = {name: np.array([[r[2 + j]] for r in rows], dtype=object) for j, name in enumerate(TEXT)}
    return {"features": features, **text}


# ---------------------------------------------------------------- training


def test_schema_is_inferred_printed_and_stored(mixed_run: tuple[Path, str]) -> None:
    run, printed = mixed_run
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    schema = checkpoint.schema
    assert schema.names == ("x1", "x2")  # header cells stripped; `id` dropped
    assert schema.text_names == TEXT  # `zip` holds integers but was asked to be categorical
    assert schema.columns == ("x1", "x2", *TEXT)
    assert (schema.target, schema.positive_class) == ("outcome", "yes")
    assert "positive class 'yes'" in printed
    for line in ("x1     numeric", "color  categorical", "zip    categorical"):
        assert line in printed
    color, city, zip_codes = schema.categorical
    assert set(color.categories) == set(COLORS)  # stripped; "purple" too rare; markers missing
    assert color.counts[color.other] <= 3 and color.counts[color.missing] > 0
    assert len(city.categories) == 8  # --max-categories: the rest is "other"
    assert set(zip_codes.categories) == set(ZIPS)
    assert checkpoint.encoder is not None and checkpoint.encoder.slots == (6, 10, 5)
    with np.load(run / "test_split.npz", allow_pickle=False) as saved:
        assert saved["text"].dtype.kind == "U" and saved["text"].shape[1] == 3
        assert [str(n) for n in saved["text_names"]] == list(TEXT)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["roc_auc"] > 0.7
    assert [c["name"] for c in metrics["schema"]] == list(schema.columns)


def test_codes_rare_unseen_and_missing() -> None:
    values = ["a"] * 6 + ["b"] * 5 + ["rare"] * 2 + ["", "NA", "?"]
    column = learn_column("c", values, min_count=5)
    assert column.categories == ("a", "b") and (column.other, column.missing) == (2, 3)
    assert column.counts == (6, 5, 2, 3)
    codes = column.codes(["b", "rare", "never seen", "", "NA", "na", "Na", "NaN", "NULL", "?"])
    assert codes.tolist() == [1, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    assert column.codes(["A", " a"]).tolist() == [2, 2]  # exact: case and spaces matter


def test_high_cardinality_keeps_most_frequent_with_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = [f"v{i % 100}" for i in range(1000)] + ["v0"] * 5
    with caplog.at_level(logging.WARNING):
        column = learn_column("ids", values, min_count=5, max_categories=10)
    assert len(column.categories) == 10 and column.categories[0] == "v0"
    assert column.counts[column.other] == 900
    assert "'ids' has 100 categories" in caplog.text


def test_codes_no_training_row_had_get_the_mean() -> None:
    torch.manual_seed(0)
    column = CategoricalColumn("c", ("a", "b"), (3, 1, 0, 0))  # no "other", no "missing" rows
    for kind in ("onehot", "embedding"):
        encoder = CategoryEncoder(EncoderConfig.build(kind, [column]))
        mlp = StabilizedMLP(MLPConfig(1 + encoder.config.width, hidden=(4,)))
        net = TabularNet(encoder, mlp, n_numeric=1).eval()
        fill_unseen_codes(net, [column])
        x, codes = torch.zeros(4, 1), torch.tensor([[0], [1], [2], [3]])
        with torch.no_grad():
            first = net.mlp.blocks[0][0]
            pre = first(torch.cat((x, encoder(codes)), 1))
        expected = 0.75 * pre[0] + 0.25 * pre[1]  # the training-weighted mean of "a" and "b"
        torch.testing.assert_close(pre[2], expected)
        torch.testing.assert_close(pre[3], expected)


# ---------------------------------------------------------------- the exported graph


def test_manifest_and_triton_config_layout(mixed_repository: Path) -> None:
    model_dir = mixed_repository / "mixed"
    manifest = Manifest.read(model_dir / "1" / "manifest.json")
    assert [(s.name, s.datatype, s.shape) for s in manifest.inputs] == [
        ("features", "FP32", (-1, 2)),
        ("color", "BYTES", (-1, 1)),
        ("city", "BYTES", (-1, 1)),
        ("zip", "BYTES", (-1, 1)),
    ]
    assert manifest.feature_names == ("x1", "x2") and manifest.text_columns == TEXT
    details = manifest.details
    assert (details["target"], details["positive_class"]) == ("outcome", "yes")
    assert details["missing_markers"] == list(MISSING_MARKERS)
    color = details["columns"][2]
    assert color["name"] == "color" and color["kind"] == "categorical"
    assert color["input"] == "color" and color["other"] == len(color["categories"])
    assert color["missing"] == color["other"] + 1
    assert details["columns"][0] == {**details["columns"][0], "kind": "numeric", "index": 0}
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("features", model_config_pb2.TYPE_FP32, [2]),
        ("color", model_config_pb2.TYPE_STRING, [1]),
        ("city", model_config_pb2.TYPE_STRING, [1]),
        ("zip", model_config_pb2.TYPE_STRING, [1]),
    ]
    card = (model_dir / "1" / "MODEL_CARD.md").read_text()
    assert "`color`" in card and "TYPE_STRING" in card and '"NA"' in card


def test_graph_contract(mixed_repository: Path) -> None:
    model = onnx.load(str(mixed_repository / "mixed" / "1" / "model.onnx"))
    check_onnx(model, 2, TEXT)  # full checker, signature, no BatchNormalization, opsets
    assert {"LabelEncoder", "Concat", "IsNaN", "Clip"} <= op_types(model)
    assert "BatchNormalization" not in op_types(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == OPSET and opsets[ML_DOMAIN] == ML_OPSET
    (features, *text) = model.graph.input
    assert features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [t.type.tensor_type.elem_type for t in text] == [onnx.TensorProto.STRING] * 3


def test_onnxruntime_on_raw_text_unseen_and_missing(mixed_repository: Path) -> None:
    session = _session(mixed_repository)
    base = (0.3, 48.0)
    rows = [(*base, "red", "city1", "80331"), (*base, "purple", "city1", "80331")]
    rows += [(*base, "never seen", "city1", "80331"), (*base, "Rot", "city1", "80331")]
    rows += [(*base, marker, "city1", "80331") for marker in MISSING_MARKERS]
    probability, label = session.run(None, _feeds(rows))
    assert probability.shape == label.shape == (len(rows), 1) and np.isfinite(probability).all()
    # Rows with the same codes get the same probability up to the last bits (tolerances.py: the
    # kernel may treat rows of one batch in different blocks); different codes differ far more.
    # Rare in training, never seen, a different spelling: all the one "other" code.
    assert np.ptp(probability[1:4]) <= PROBABILITY
    # Every missing marker, the empty text included, is the "missing" code.
    assert np.ptp(probability[4:]) <= PROBABILITY
    assert abs(probability[0, 0] - probability[1, 0]) > 100 * PROBABILITY
    assert abs(probability[1, 0] - probability[4, 0]) > 100 * PROBABILITY
    np.testing.assert_array_equal(label, (probability >= 0.5).astype(np.int64))


def test_extreme_finite_numbers_give_finite_probabilities(mixed_repository: Path) -> None:
    session = _session(mixed_repository)
    values = [*EXTREMES, float("nan")]
    rows = [(a, b, "red", "city2", "10115") for a in values for b in values]
    probability, _ = session.run(None, _feeds(rows))
    assert np.isfinite(probability).all()


def test_torchscript_takes_text_in_a_fresh_process(mixed_repository: Path, tmp_path: Path) -> None:
    version = mixed_repository / "mixed" / "1"
    rows = [(0.3, 48.0, "red", "city1", "80331"), (float("nan"), 3.4e38, "", "zzz", "NA")]
    numbers = json.dumps([[r[0], r[1]] for r in rows])  # NaN travels as JSON's NaN
    text = json.dumps([[r[2 + j] for r in rows] for j in range(3)])
    code = (
        "import json, sys, torch\n"
        f"m = torch.jit.load({str(version / 'model.pt')!r})\n"
        f"p, l = m(torch.tensor(json.loads({numbers!r})), json.loads({text!r}))\n"
        "assert 'stablemlp' not in sys.modules\n"
        "print(json.dumps([p.flatten().tolist(), l.flatten().tolist()]))\n"
    )
    probability, label = json.loads(run_isolated(code, tmp_path))
    expected, expected_label = _session(mixed_repository).run(None, _feeds(rows))
    np.testing.assert_allclose(probability, expected[:, 0], atol=PROBABILITY)
    assert label == expected_label[:, 0].tolist()


def test_parity_covers_held_out_unseen_missing_and_extremes(mixed_repository: Path) -> None:
    parity = json.loads((mixed_repository / "mixed" / "1" / "parity.json").read_text())
    assert parity["passed"] and parity["labels_identical"]
    assert set(parity["max_abs_diff"]) == {"folded", "torchscript", "onnxruntime"}
    assert {"test", "random_1", "random_7", "random_1024", "extreme_16"} == set(parity["batches"])
    assert max(parity["max_abs_diff"].values()) <= PROBABILITY


def test_verify_regenerates_text_rows(
    mixed_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify_main([str(mixed_repository)]) == 0
    assert "OK mixed/1" in capsys.readouterr().out


# ---------------------------------------------------------------- the lookup itself


_COLUMN = CategoricalColumn("c", ("Adelie", "Gentoo", "Zürich"), (1,) * 5)
_TEXT = st.one_of(
    st.sampled_from([*_COLUMN.categories, *MISSING_MARKERS, "adelie", " NA", "NA "]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)


@pytest.fixture(scope="module")
def lookup_session() -> ort.InferenceSession:
    graph = onnx.helper.make_graph(
        lookup_nodes([_COLUMN], "codes"),
        "lookup",
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.STRING, ["n", 1])],
        [onnx.helper.make_tensor_value_info("codes", onnx.TensorProto.INT64, ["n", 1])],
    )
    opsets = [onnx.helper.make_opsetid("", OPSET), onnx.helper.make_opsetid(ML_DOMAIN, ML_OPSET)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(_TEXT, min_size=1, max_size=20))
def test_onnx_lookup_torch_lookup_and_training_codes_agree(
    lookup_session: ort.InferenceSession, values: list[str]
) -> None:
    expected = _COLUMN.codes(values)
    (onnx_codes,) = lookup_session.run(None, {"c": np.array(values, dtype=object).reshape(-1, 1)})
    torch_codes = TextLookup([_COLUMN])([values])
    assert onnx_codes[:, 0].tolist() == expected.tolist() == torch_codes[:, 0].tolist()


# ---------------------------------------------------------------- other shapes of data


def test_text_only_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = ["shape (Größe),size,label"]  # an input name with spaces and non-ASCII
    for _ in range(150):
        shape, size = str(rng.choice(["round", "square", "star"])), str(rng.choice(["S", "M"]))
        lines.append(f"{shape},{size},{int(shape == 'star') if rng.random() < 0.9 else 1}")
    path = tmp_path / "text.csv"
    path.write_text("\n".join(lines) + "\n")
    run, repository = tmp_path / "run", tmp_path / "repo"
    args = ["--csv", str(path), "--target", "label", "--epochs", "5", "--no-progress"]
    assert train_main([*args, "--output", str(run)]) == 0
    assert export_main([str(run), "--repository", str(repository)]) == 0
    manifest = Manifest.read(repository / "text" / "1" / "manifest.json")
    assert [s.name for s in manifest.inputs] == ["shape (Größe)", "size"]
    assert not manifest.feature_names
    session = ort.InferenceSession(
        str(repository / "text" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        "shape (Größe)": np.array([["star"], ["?"]], object),
        "size": np.array([["S"], ["XL"]], object),
    }
    probability, _ = session.run(None, feeds)
    assert np.isfinite(probability).all() and probability[0, 0] > probability[1, 0]
    assert verify_main([str(repository)]) == 0
    config = text_format.Parse(
        (repository / "text" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert [i.name for i in config.input] == ["shape (Größe)", "size"]


def test_triton_config_escapes_column_names() -> None:
    names = ['size "cm"', "back\\slash", "Größe"]
    text = config_pbtxt("m", 0, text_columns=names)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [i.name for i in config.input] == names
    assert {i.data_type for i in config.input} == {model_config_pb2.TYPE_STRING}


@pytest.mark.parametrize("encoding", ["embedding"])
def test_embedding_encoding_exports_with_parity(tmp_path: Path, encoding: str) -> None:
    path = write_mixed_csv(tmp_path / "mixed.csv", rows=200, seed=1)
    run, repository = tmp_path / "run", tmp_path / "repo"
    args = ["--csv", str(path), "--target", "outcome", "--drop", "id", "--encoding", encoding]
    assert train_main([*args, "--epochs", "3", "--no-progress", "--output", str(run)]) == 0
    assert export_main([str(run), "--repository", str(repository)]) == 0
    assert "Gather" in op_types(onnx.load(str(repository / "mixed" / "1" / "model.onnx")))


def test_penguins_end_to_end(tmp_path: Path) -> None:
    """A real data set with text categories that a package ships: palmerpenguins, target `sex`."""
    pytest.importorskip("palmerpenguins")
    from sklearn.metrics import roc_auc_score

    from stablemlp.bench.quality import penguins_csv

    path, run, repository = penguins_csv(tmp_path), tmp_path / "run", tmp_path / "repo"
    # --no-refit: the saved validation rows then stay unseen by the final model, so the AUC
    # below is a held-out figure.
    args = ["--csv", str(path), "--target", "sex", "--epochs", "60", "--no-progress", "--no-refit"]
    assert train_main([*args, "--output", str(run)]) == 0
    assert export_main([str(run), "--repository", str(repository)]) == 0
    manifest = Manifest.read(repository / "penguins" / "1" / "manifest.json")
    assert manifest.text_columns == ("species", "island")
    assert manifest.details["positive_class"] == "male"
    with np.load(run / "test_split.npz", allow_pickle=False) as saved:
        features, text, labels = saved["features"], saved["text"], saved["labels"]
    session = ort.InferenceSession(
        str(repository / "penguins" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        "features": features,
        **{n: text[:, [j]].astype(object) for j, n in enumerate(("species", "island"))},
    }
    probability, _ = session.run(None, feeds)
    assert roc_auc_score(labels, probability[:, 0]) > 0.85
