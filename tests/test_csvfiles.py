"""CSV files as people download them (issue 22): delimiters, quoting, BOM, encodings, CRLF,
trailing delimiters; identifier columns left out; the positive class; files read in batches;
bad files refused in one line with nothing written. Every file is generated small in tmp_path."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import HeldOutSplit, ServerProcess

from stablemlp.csvfile import BATCH_ROWS, CsvError, open_csv
from stablemlp.model.cli import main as train_main
from stablemlp.model.csvdata import load_csv
from stablemlp.model.data import DataError
from stablemlp.serving.client import cli as predict_cli
from stablemlp.serving.client.columns import Schema, csv_batches

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]


def rows(n: int = 60, seed: int = 0) -> list[list[str]]:
    """A header and `n` rows: a number, a text category, a yes/no target that follows them."""
    rng = np.random.default_rng(seed)
    out = [["age", "job", "y"]]
    for i in range(n):
        age = int(rng.integers(18, 80))
        job = ["admin.", "services", "technician"][i % 3]
        out.append([str(age), job, "yes" if age + 10 * (i % 3) > 55 else "no"])
    return out


def write(
    path: Path,
    table: list[list[str]],
    sep: str = ",",
    quote: bool = False,
    end: str = "\n",
    encoding: str = "utf-8",
    trailing: str = "",
) -> Path:
    """Written as exporters write: `quote` puts every text value in double quotes (numbers
    bare), `trailing` ends every line with it (a trailing delimiter)."""

    def cell(value: str) -> str:
        bare = value.replace(".", "", 1).isdigit()
        return value if bare or not quote else '"' + value.replace('"', '""') + '"'

    text = "".join(sep.join(cell(v) for v in row) + trailing + end for row in table)
    path.write_bytes(text.encode(encoding))
    return path


def train(
    tmp_path: Path, path: Path, *options: str, capsys: pytest.CaptureFixture[str] | None = None
) -> tuple[int, Path]:
    out = tmp_path / "run"
    args = ["--csv", str(path), "--target", "y", "--epochs", "1", "--no-progress", *options]
    return train_main([*args, "--output", str(out)]), out


# ---------------------------------------------------------------- 1. reading


def test_the_bank_marketing_file_as_published(tmp_path: Path) -> None:
    """`;`-delimited, every text value quoted: the issue's first file."""
    path = write(tmp_path / "bank.csv", rows(), sep=";", quote=True)
    assert path.read_text().startswith('"age";"job";"y"\n70;"admin.";"yes"')
    data = load_csv(path, "y")
    assert (data.feature_names, data.text_names) == (["age"], ["job"])
    assert set(data.text[:, 0]) == {"admin.", "services", "technician"}
    assert "';'-delimited, UTF-8" in data.notes[0]
    assert train(tmp_path, path)[0] == 0


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
def test_each_delimiter_is_detected(tmp_path: Path, sep: str) -> None:
    table = [*rows(30), ["40", "a, b; c | d", "no"]]  # the other delimiters inside a value
    path = write(tmp_path / "data.csv", table, sep=sep, quote=True)
    data = load_csv(path, "y")
    assert data.text[-1, 0] == "a, b; c | d" and data.features[:3, 0].tolist() == [
        float(r[0]) for r in table[1:4]
    ]


def test_sep_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", rows(), sep=";")
    with pytest.raises(DataError, match=r"target column 'y' not in CSV header \['age;job;y'\]"):
        load_csv(path, "y", sep=",")
    assert load_csv(path, "y", sep=";").feature_names == ["age"]
    with pytest.raises(DataError, match="--sep: expected one character or 'tab', got ';;'"):
        load_csv(path, "y", sep=";;")
    tabs = write(tmp_path / "tabs.csv", rows(), sep="\t")
    assert load_csv(tabs, "y", sep="tab").columns == load_csv(tabs, "y", sep="\\t").columns


def test_utf8_bom_crlf_and_utf16(tmp_path: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes(
        b"\xef\xbb\xbf" + write(tmp_path / "plain.csv", rows(), end="\r\n").read_bytes()
    )
    data = load_csv(bom, "y")
    assert data.columns == ("age", "job") and not any("\r" in v for v in data.text[:, 0])
    utf16 = write(tmp_path / "excel.txt", rows(), sep="\t", encoding="utf-16", end="\r\n")
    assert utf16.read_bytes()[:2] == b"\xff\xfe"  # Excel's "Unicode text"
    assert load_csv(utf16, "y").columns == ("age", "job")


def test_a_file_that_is_not_utf8_names_the_line_and_reads_with_its_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = rows()
    table[7][1] = "employé"
    path = write(tmp_path / "latin.csv", table, encoding="cp1252")
    code, out = train(tmp_path, path)
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and err.count("\n") == 1
    assert err.startswith("stablemlp train: error: latin.csv line 8: byte b'\\xe9' at column 10")
    assert "--file-encoding" in err
    data = load_csv(path, "y", file_encoding="cp1252")
    assert "employé" in data.text[:, 0]
    with pytest.raises(DataError, match="unknown file encoding 'klingon'"):
        load_csv(path, "y", file_encoding="klingon")


def test_a_bad_byte_past_the_sniffed_sample_names_its_line(tmp_path: Path) -> None:
    table = rows(5000)  # ~78 KB: the first 64 KiB decode, the bad byte comes while reading
    table[4900][1] = "caf\udce9"  # a lone 0xE9 byte once written with surrogateescape
    path = tmp_path / "late.csv"
    path.write_bytes("".join(",".join(r) + "\n" for r in table).encode("utf-8", "surrogateescape"))
    assert path.stat().st_size > 65536
    with pytest.raises(DataError, match=r"late.csv line 4901: byte b'\\xe9' at column \d+ is not"):
        load_csv(path, "y")


def test_trailing_delimiters_are_dropped_and_a_value_beyond_the_header_refused(
    tmp_path: Path,
) -> None:
    every_line = write(tmp_path / "a.csv", rows(), trailing=",", end="\r\n")  # header too
    assert load_csv(every_line, "y").columns == ("age", "job")
    body_only = rows()
    text = "\n".join([",".join(body_only[0])] + [",".join(r) + "," for r in body_only[1:]])
    (tmp_path / "b.csv").write_text(text + "\n")  # every row one field longer than the header
    assert load_csv(tmp_path / "b.csv", "y").columns == ("age", "job")
    (tmp_path / "c.csv").write_text(text.replace("no,\n", "no,oops\n", 1) + "\n")
    with pytest.raises(DataError, match=r"c.csv line \d+: 4 fields, the header has 3 \(a delim"):
        load_csv(tmp_path / "c.csv", "y")


def test_predict_reads_files_the_same_way(tmp_path: Path) -> None:
    table = rows(5)
    table[2][0] = "unknown"
    path = write(tmp_path / "score.csv", table, sep=";", quote=True, end="\r\n", trailing=";")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    schema = Schema("m", "features", ("age",), ("job",), 64)
    (batch,) = csv_batches(path, schema, 64, na_values=["unknown"])
    assert batch.rows == 5 and math.isnan(batch.numeric[1, 0])
    assert batch.numeric[0, 0] == float(table[1][0]) and batch.text["job"][0] == "admin."
    with pytest.raises(ValueError, match="row 1 column 'age': got 'unknown', expected a number"):
        list(csv_batches(path, schema, 64))
    with pytest.raises(ValueError, match=r"header lacks the model's columns \['age', 'job'\]"):
        list(csv_batches(path, schema, 64, sep=","))  # --sep overrides detection here too
    with pytest.raises(CsvError, match="is empty"):
        open_csv(write(tmp_path / "empty.csv", []))


def test_predict_csv_streams_a_semicolon_crlf_file(
    model_repository: Path,
    start_server: StartServer,
    tmp_path: Path,
    test_split: HeldOutSplit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = [list(test_split.feature_names)]
    table += [["" if math.isnan(v) else repr(float(v)) for v in row] for row in test_split.features]
    path = write(tmp_path / "rows.csv", table, sep=";", end="\r\n", trailing=";")
    broken = write(tmp_path / "broken.csv", [*table, ["1;2"]], sep=";")
    with start_server(model_repository, "--max-batch-size", "16") as srv:
        assert predict_cli.main(["--server", srv.address, "--csv", str(broken)]) == 1
        failed = capsys.readouterr()
        assert predict_cli.main(["--server", srv.address, "--csv", str(path)]) == 0
    # A row the reader refuses mid-stream ends the stream with the reader's error.
    assert f"broken.csv line {len(table) + 1}: 2 fields, the header has 30" in failed.err
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == "row,probability,label" and len(lines) == len(test_split.features) + 1
    assert [int(line.rsplit(",", 1)[1]) for line in lines[1:]] == test_split.label[:, 0].tolist()
    assert "one stream" in out.err and "rows/s" in out.err


# ---------------------------------------------------------------- 2. columns


def _with_ids(n: int = 60) -> list[list[str]]:
    """rows() plus a unique customer id (text), a shuffled row number and a non-index integer."""
    rng = np.random.default_rng(1)
    order = rng.permutation(n) + 1
    table = [["customer_id", "row", "visits", *rows(0)[0]]]
    for i, row in enumerate(rows(n)[1:]):
        table.append([f"{7590 + i * 13}-VHVEH", str(order[i]), str(i % 7), *row])
    return table


def test_identifier_columns_are_left_out_with_a_note_and_kept_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "churn.csv", _with_ids())
    data = load_csv(path, "y")
    assert data.columns == ("visits", "age", "job")
    assert any("left out 'customer_id': text unique in 100% of its rows" in n for n in data.notes)
    assert any("left out 'row': integers numbering the rows" in n for n in data.notes)
    code, _ = train(tmp_path, path)
    printed = capsys.readouterr().out
    assert code == 0 and "left out 'customer_id'" in printed and "--keep customer_id" in printed
    kept = load_csv(path, "y", keep=["customer_id", "row"])
    assert kept.columns == ("customer_id", "row", "visits", "age", "job")
    with pytest.raises(DataError, match="--keep: no column 'nope'"):
        load_csv(path, "y", keep=["nope"])


def test_train_passes_every_reading_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _with_ids()
    table[5][2] = "unknown"  # visits
    path = write(tmp_path / "churn.txt", table, sep="|", encoding="cp1252")
    options = ["--sep", "|", "--file-encoding", "cp1252", "--keep", "customer_id"]
    options += ["--na-values", "unknown", "--positive-class", "no", "--encoding", "embedding"]
    code, out = train(tmp_path, path, *options)
    printed = capsys.readouterr().out
    assert code == 0 and (out / "checkpoint.pt").exists()
    assert "positive class 'no': --positive-class" in printed
    assert "customer_id  categorical" in printed and "left out 'row'" in printed
    assert "visits       numeric      mean" in printed  # "unknown" read as missing


def test_an_unnamed_index_column_as_pandas_writes_it(tmp_path: Path) -> None:
    table = [[str(i - 1) if i else "", *row] for i, row in enumerate(rows())]
    data = load_csv(write(tmp_path / "frame.csv", table), "y")  # ",age,job,y" then "0,..."
    assert data.columns == ("age", "job")
    assert "left out column 1 (no name): integers numbering the rows (a row index)" in data.notes
    for i, row in enumerate(table[1:]):
        row[0] = "abc"[i % 3]  # a category under no name: refused
    with pytest.raises(DataError, match=r"column 1 name '': expected 1\.\.128 printable"):
        load_csv(write(tmp_path / "frame.csv", table), "y")


def test_small_files_and_repeated_values_keep_their_columns(tmp_path: Path) -> None:
    short = write(tmp_path / "short.csv", _with_ids(12))  # too few rows to call it an id
    assert load_csv(short, "y").columns[:2] == ("customer_id", "row")
    table = _with_ids()
    for row in table[1:]:
        row[0] = row[0][:2]  # 60 rows, a handful of values: a category
    assert "customer_id" in load_csv(write(tmp_path / "c.csv", table), "y").columns


def test_na_values_add_missing_markers(tmp_path: Path) -> None:
    table = rows()
    table[3][0], table[4][1], table[5][0] = "unknown", "unknown", "-999"
    path = write(tmp_path / "data.csv", table)
    plain = load_csv(path, "y")
    assert plain.text_names == ["age", "job"]  # "unknown" is text: age is not a number
    data = load_csv(path, "y", na_values=["unknown", "-999"])
    assert data.feature_names == ["age"] and math.isnan(data.features[2, 0])
    assert math.isnan(data.features[4, 0])  # a number as a marker: -999 means missing
    assert data.text[3, 0] == "" and data.text[4, 0] == table[5][1]  # "": the missing category


# ---------------------------------------------------------------- 3. target


@pytest.mark.parametrize(
    ("values", "positive"),
    [
        (("No", "Yes"), "Yes"),
        (("false", "true"), "true"),
        (("0", "1"), "1"),
        (("0.0", "1.0"), "1.0"),
    ],
)
def test_obvious_pairs_choose_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, values: tuple[str, str], positive: str
) -> None:
    table = [[*r[:2], values[r[2] == "yes"]] if i else r for i, r in enumerate(rows())]
    with caplog.at_level(logging.WARNING):
        data = load_csv(write(tmp_path / "data.csv", table), "y")
    assert data.positive_class == positive and "positive class" not in caplog.text
    assert data.labels.tolist() == [int(r[2] == positive) for r in table[1:]]


@pytest.mark.parametrize(
    ("values", "chosen", "rule"),
    [
        (("bad", "good"), "good", "the later of 'bad' and 'good' in sorted order"),
        (("stayed", "churned"), "stayed", "the later of 'churned' and 'stayed' in sorted order"),
        (("2", "1"), "2", "the larger number of '1' and '2'"),
    ],
)
def test_other_pairs_warn_naming_the_choice_and_positive_class_overrides(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    values: tuple[str, str],
    chosen: str,
    rule: str,
) -> None:
    table = [[*r[:2], values[r[2] == "yes"]] if i else r for i, r in enumerate(rows())]
    path = write(tmp_path / "data.csv", table)
    with caplog.at_level(logging.WARNING):
        data = load_csv(path, "y")
    assert data.positive_class == chosen and f"positive class {chosen!r}: {rule}" in data.notes
    assert f"positive class {chosen!r}, {rule}" in caplog.text and "--positive-class" in caplog.text
    other = values[1] if chosen == values[0] else values[0]
    flipped = load_csv(path, "y", positive_class=other)
    assert flipped.positive_class == other and (flipped.labels == 1 - data.labels).all()
    with pytest.raises(DataError, match=r"--positive-class 'maybe': target 'y' holds"):
        load_csv(path, "y", positive_class="maybe")


def test_the_rule_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, write(tmp_path / "data.csv", rows()))[0] == 0
    assert "positive class 'yes': 'yes' of the pair 'no'/'yes'" in capsys.readouterr().out


# ---------------------------------------------------------------- 4. big files, in batches


def test_a_column_that_turns_text_after_the_first_batch(tmp_path: Path) -> None:
    n = BATCH_ROWS + 50
    table = [["code", "x", "y"]]
    table += [[f"{i % 9:03d}", str(i % 11), "yes" if i % 2 else "no"] for i in range(n)]
    table[-1][0] = "A1"  # text only in the second batch: read again as text
    data = load_csv(write(tmp_path / "data.csv", table), "y")
    assert data.text_names == ["code"] and data.feature_names == ["x"]
    assert data.text[:2, 0].tolist() == ["000", "001"] and data.text[-1, 0] == "A1"
    assert len(data) == n and data.features.dtype == np.float32


def test_the_bench_file_has_30_columns_and_its_id_is_left_out(tmp_path: Path) -> None:
    from stablemlp.bench.csv_scale import write_csv

    path = tmp_path / "big.csv"
    write_csv(path, 500)
    data = load_csv(path, "y")
    assert len(data) == 500 and len(data.columns) == 28  # 30 less the target and the id
    assert data.features.dtype == np.float32 and np.isnan(data.features).any()
    assert any("left out 'customer_id'" in note for note in data.notes)


def test_progress_bar_over_the_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_csv(write(tmp_path / "data.csv", rows()), "y", progress=True)
    assert "read data.csv" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. bad files

BAD = [
    ("empty", "", "is empty"),
    ("blank lines", "\n\n \n", "is empty"),
    ("header only", "age,job,y\n", "has a header but no data rows"),
    ("duplicate name", "a,a,y\n1,2,no\n3,4,yes\n", "column 'a' appears twice"),
    ("empty name", "a,,y\n1,2,no\n3,4,yes\n", "column 2 name '': expected 1..128"),
    ("one class", "a,y\n1,no\n2,no\n", "must have exactly 2 classes, found 1: 'no'"),
    ("three classes", "a,y\n1,no\n2,yes\n3,maybe\n", "exactly 2 classes, found 3"),
    ("all missing", "a,b,y\n1,,no\n2,NA,yes\n", "column 'b' is empty (missing in every row)"),
    ("named probability", "probability,y\n0.5,no\n0.7,yes\n", "'probability' is named like an"),
    ("named label", "label,y\nx,no\nz,yes\n", "text column 'label' would become an input"),
    ("short row", "a,b,y\n1,2,no\n3,yes\n", "data.csv line 3: 2 fields, the header has 3"),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_files_get_one_line_and_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, message: str
) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text)
    code, out = train(tmp_path, path)
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith("stablemlp train: error: ") and err.count("\n") == 1
    assert message in err


def test_describe_lists_format_rule_and_left_out(tmp_path: Path) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train(tmp_path, write(tmp_path / "c.csv", _with_ids(), sep="|"))[0] == 0
    text = printed.getvalue()
    assert "read c.csv: '|'-delimited, UTF-8, 60 rows" in text
    assert text.index("left out 'row'") < text.index("visits")
