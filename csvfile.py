"""CSV files as people download them, read the same way by `train` and `predict --csv`.

Detects the delimiter (`,` `;` tab `|`), quoting and a UTF-8/UTF-16 byte-order mark; reads CRLF,
drops trailing delimiters, names the line of an undecodable byte or a row of the wrong width.
Rows come in batches, so callers parse a batch into arrays at a time and never hold the file as
Python strings. Standard library only, so `predict` in the serving install (no torch) uses it too.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DELIMITERS = ",;\t|"
# Sniffing looks at the first lines only: csv.Sniffer's regexes grow slow on long samples, and a
# delimiter that splits 50 lines into equal field counts is the one.
SAMPLE_BYTES = 1 << 16
SAMPLE_LINES = 50
# Rows per batch: ~16k rows x 30 columns is a few MB of strings while it is parsed.
BATCH_ROWS = 1 << 14
_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


class CsvError(ValueError):
    """The file cannot be read as CSV; the one-line message names the file and the line."""


@dataclass(frozen=True)
class CsvFormat:
    """How the file is written: what was detected, or asked for."""

    delimiter: str
    quotechar: str
    encoding: str  # the codec the file is opened with ("utf-8-sig" also reads plain UTF-8)

    def describe(self) -> str:
        name = {"utf-8-sig": "UTF-8", "utf-16": "UTF-16"}.get(self.encoding, self.encoding)
        return f"{_NAMES.get(self.delimiter, repr(self.delimiter))}-delimited, {name}"


@dataclass(frozen=True)
class CsvFile:
    """An opened CSV: its format, its header (names stripped) and where its data rows start."""

    path: Path
    format: CsvFormat
    header: tuple[str, ...]
    size: int  # bytes, for a progress bar

    def batches(
        self, rows: int = BATCH_ROWS, progress: Callable[[int], None] | None = None
    ) -> Iterator[list[list[str]]]:
        """The data rows, `rows` at a time, each exactly as wide as the header; cells as written
        (unstripped). Blank lines are skipped. `progress(n)` gets the bytes read since its last
        call."""
        with self.path.open("rb") as raw:
            text = io.TextIOWrapper(raw, encoding=self.format.encoding, newline="")
            reader = _reader(text, self.format)
            seen = 0
            try:
                _first_record(reader)  # the header
                while batch := self._batch(reader, rows):
                    if progress is not None:
                        progress(raw.tell() - seen)
                        seen = raw.tell()
                    yield batch
            except UnicodeDecodeError as err:
                raise CsvError(_decode_error(self.path, self.format.encoding, err)) from None
            except csv.Error as err:
                raise CsvError(f"{self.path.name} line {reader.line_num}: {err}") from None

    def _batch(self, reader: Any, size: int) -> list[list[str]]:
        width, batch = len(self.header), []
        for row in itertools.islice(reader, size):
            if len(row) != width:
                fitted = self._trim(row, reader.line_num)
                if fitted is None:
                    continue
                row = fitted
            elif not row[0] and not any(cell.strip() for cell in row):
                continue  # a line of empty fields (",,,"), as spreadsheets append
            batch.append(row)
        return batch

    def _trim(self, row: list[str], line: int) -> list[str] | None:
        """A row with a field count other than the header's: blank (None), trailing empty fields
        dropped, or an error naming the line."""
        width = len(self.header)
        if not any(cell.strip() for cell in row):
            return None
        if len(row) > width and not any(cell.strip() for cell in row[width:]):
            return row[:width]  # a trailing delimiter (or several): nothing beyond the header
        hint = (
            " (a delimiter inside an unquoted value? --sep chooses the delimiter)"
            if len(row) > width
            else ""
        )
        raise CsvError(
            f"{self.path.name} line {line}: {len(row)} fields, the header has {width}{hint}"
        )


def open_csv(path: Path, sep: str | None = None, encoding: str | None = None) -> CsvFile:
    """Detect the file's format (or take `sep`/`encoding`) and read its header."""
    try:
        with path.open("rb") as raw:
            head = raw.read(SAMPLE_BYTES)
        size = path.stat().st_size
    except OSError as err:
        raise CsvError(f"cannot read CSV {str(path)!r}: {err.strerror}") from None
    codec = _codec(head, encoding)
    try:
        sample = codecs.getincrementaldecoder(codec)().decode(head, final=len(head) == size)
    except UnicodeDecodeError as err:
        raise CsvError(_decode_error(path, codec, err)) from None
    lines = sample.splitlines(keepends=True)
    if len(head) < size and len(lines) > 1:
        lines = lines[:-1]  # the last line of the sample may be cut short
    lines = [line for line in lines if line.strip()][:SAMPLE_LINES]
    if not lines:
        raise CsvError(f"CSV {str(path)!r} is empty")
    delimiter, quotechar = _delimiter(lines, sep)
    found = CsvFormat(delimiter, quotechar, codec)
    reader = _reader(io.StringIO("".join(lines), newline=""), found)
    try:
        header = [name.strip() for name in _first_record(reader)]
    except csv.Error as err:
        raise CsvError(f"{path.name} line {reader.line_num}: {err}") from None
    while len(header) > 1 and not header[-1]:
        header.pop()  # a trailing delimiter after the last name
    return CsvFile(path, found, tuple(header), size)


def _reader(stream: IO[str], found: CsvFormat) -> Any:
    """csv's reader (the excel dialect: doubled quotes escape a quote) with the file's format."""
    return csv.reader(stream, delimiter=found.delimiter, quotechar=found.quotechar)


def _first_record(reader: Iterator[list[str]]) -> list[str]:
    for row in reader:
        if any(cell.strip() for cell in row):
            return row
    return []


def _codec(head: bytes, encoding: str | None) -> str:
    """The codec to open the file with: the caller's, else what its byte-order mark says, else
    UTF-8. "utf-8-sig" stands for UTF-8: it drops a BOM and reads plain UTF-8 as well."""
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise CsvError(f"unknown file encoding {encoding!r}") from None
        return "utf-8-sig" if name in {"utf-8", "utf-8-sig"} else name
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"  # what Excel's "Unicode text" writes
    return "utf-8-sig"


def _decode_error(path: Path, codec: str, err: UnicodeDecodeError) -> str:
    """The first line of `path` that `codec` cannot decode, found again line by line (the error
    itself only knows an offset inside a buffer)."""
    line_number, column, byte = 0, err.start, err.object[err.start : err.start + 1]
    decoder = codecs.getincrementaldecoder(codec)()
    with path.open("rb") as raw:
        for line_number, line in enumerate(raw, start=1):  # noqa: B007 (used after the loop)
            try:
                decoder.decode(line)
            except UnicodeDecodeError as found:
                column, byte = found.start + 1, found.object[found.start : found.start + 1]
                break
    name = {"utf-8-sig": "UTF-8"}.get(codec, codec)
    return (
        f"{path.name} line {line_number}: byte {byte!r} at column {column} is not {name} text "
        "(name the file's encoding with --file-encoding, e.g. cp1252 or latin-1)"
    )


def _delimiter(lines: list[str], sep: str | None) -> tuple[str, str]:
    """(delimiter, quote character): `sep` if given, else csv.Sniffer's guess if it splits every
    sampled line into the header's field count, else the candidate that does so for the most
    lines (ties: more fields)."""
    if sep:
        sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
        if len(sep) != 1:
            raise CsvError(f"--sep: expected one character or 'tab', got {sep!r}")
        return sep, '"'
    sample = "".join(lines)
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=DELIMITERS)
        quotechar = sniffed.quotechar or '"'
        share, width = _fit(lines, sniffed.delimiter, quotechar)
        if share == 1.0 and width > 1:
            return sniffed.delimiter, quotechar
    except csv.Error:
        pass
    scores = {d: _fit(lines, d, '"') for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: scores[d])
    return (best if scores[best][1] > 1 else ","), '"'


def _fit(lines: list[str], delimiter: str, quotechar: str) -> tuple[float, int]:
    """(share of rows as wide as the header, the header's width) under this delimiter."""
    rows = list(csv.reader(io.StringIO("".join(lines)), delimiter=delimiter, quotechar=quotechar))
    rows = [row for row in rows if row]
    if not rows:
        return 0.0, 0
    width = len(rows[0])
    while width > 1 and not rows[0][width - 1].strip():
        width -= 1  # trailing delimiters do not count as columns
    same = sum(1 for row in rows if width <= len(row) and not any(c.strip() for c in row[width:]))
    return same / len(rows), width


__all__ = ["BATCH_ROWS", "DELIMITERS", "CsvError", "CsvFile", "CsvFormat", "open_csv"]
