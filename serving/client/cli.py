"""`stablemlp predict`: score a CSV (columns matched by name) or one row of numbers on a server.

Prints `row,probability,label` lines as the answers come; a file is read a request at a time
(the same reader as `train --csv`), and when it holds more than one request the rows go over one
ModelStreamInfer call (a bounded window in flight): memory stays bounded whatever the file's size.
The rate is reported on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from .calls import WINDOW, Result, Security, pick_model, results, schema, stub_for
from .columns import ClientError, Columns, Schema, csv_batches, number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemlp predict",
        description="Send rows to a running server; print each row's probability and label.",
    )
    parser.add_argument("--server", default="localhost:8001", help="HOST:PORT of `stablemlp serve`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--csv", type=Path, help="rows to score: a header row names the columns (any order)"
    )
    source.add_argument(
        "--features", help='one row of a numbers-only model: "v1,v2,..." (empty = missing)'
    )
    parser.add_argument(
        "--sep", metavar="CHAR", help="--csv's delimiter (default: detected among , ; tab |)"
    )
    parser.add_argument(
        "--file-encoding", metavar="CODEC", help="--csv's text encoding (default: UTF-8)"
    )
    parser.add_argument(
        "--na-values",
        default="",
        metavar="TEXT,...",
        help="more --csv cells meaning 'missing' (as given to `train --na-values`)",
    )
    parser.add_argument("--model", help="model name (default: the server's only model)")
    parser.add_argument("--version", default="", help="model version (default: newest ready)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--no-stream", action="store_true", help="one unary call per request")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: use TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", default="", help="name the certificate must carry")
    parser.add_argument(
        "--token-file", type=Path, help="bearer token file (or env STABLEMLP_AUTH_TOKEN)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        token = os.environ.get("STABLEMLP_AUTH_TOKEN", "")
        if args.token_file:
            token = args.token_file.read_text(encoding="utf-8")
        security = Security(
            args.tls_ca, args.tls_cert, args.tls_key, token.strip(), args.tls_server_name
        )
        with security.channel(args.server) as channel:
            stub = stub_for(channel)
            model = args.model or pick_model(stub, args.timeout, security)
            found = schema(stub, model, args.version, args.timeout, security)
            started = time.perf_counter()  # reading the file is part of the rate
            chunks, count = _chunks(args, found)
            first = list(itertools.islice(chunks, 2))  # more than one request: a stream
            stream = not args.no_stream and len(first) > 1
            answers = results(stub, itertools.chain(first, chunks), found, args.version,
                              args.timeout, security, stream, WINDOW, count)  # fmt: skip
            rows = _write(answers, sys.stdout)
            seconds = time.perf_counter() - started
    except grpc.RpcError as err:
        print(f"stablemlp predict: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (ClientError, OSError, ValueError) as err:
        print(f"stablemlp predict: {err}", file=sys.stderr)
        return 1
    way = "one stream" if stream else "unary calls"
    print(f"stablemlp predict: {rows} rows in {seconds:.3f} s "
          f"({rows / max(seconds, 1e-9):,.0f} rows/s, {way})", file=sys.stderr)  # fmt: skip
    return 0


def _chunks(args: argparse.Namespace, found: Schema) -> tuple[Iterator[Columns], int]:
    """The requests' rows, read lazily from --csv, and at most how many requests they make."""
    if args.features is None:
        na_values = [value for value in args.na_values.split(",") if value.strip()]
        batches = csv_batches(
            args.csv, found, found.max_batch_size, args.sep, args.file_encoding, na_values
        )
        return batches, _lines(args.csv) // found.max_batch_size + 1
    cells = args.features.split(",")
    values = [[number(cell, f"#{i}", 0) for i, cell in enumerate(cells)]]
    if found.text_columns or len(cells) != len(found.feature_names):
        raise ClientError(
            f"--features: got {len(cells)} values, expected [N, {len(found.feature_names)}] "
            f"numbers for model '{found.model}'"
            + (" (it has text columns: use --csv)" if found.text_columns else "")
        )
    return iter([Columns(np.asarray(values, dtype=np.float32), {})]), 1


def _lines(path: Path) -> int:
    """Line breaks in the file: at least its row count (quoted values may hold more)."""
    lines = 0
    with path.open("rb") as raw:
        while block := raw.read(1 << 20):
            lines += block.count(b"\n")
    return lines + 1


def _write(answers: Iterator[list[Result]], out: TextIO) -> int:
    """`row,probability,label` lines as the answers come; the number of rows."""
    out.write("row,probability,label\n")
    rows = 0
    for answer in answers:
        out.write("".join(f"{rows + i},{p:.6f},{label}\n" for i, (p, label) in enumerate(answer)))
        rows += len(answer)
    return rows


__all__ = ["build_parser", "main"]
