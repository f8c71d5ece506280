"""`stablemlp predict`: score a CSV (columns matched by name) or one row of numbers on a server.

Prints `row,probability,label` lines; for a file larger than one request the rows go over one
ModelStreamInfer call (a bounded window in flight) and the rate is reported on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from .client import Security, pick_model, schema, send, stub_for
from .tables import ClientError, Columns, number, read_csv


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
            if args.features is not None:
                cells = args.features.split(",")
                values = [[number(cell, f"#{i}", 0) for i, cell in enumerate(cells)]]
                if found.text_columns or len(cells) != len(found.feature_names):
                    raise ClientError(
                        f"--features: got {len(cells)} values, expected [N, "
                        f"{len(found.feature_names)}] numbers for model '{model}'"
                        + (" (it has text columns: use --csv)" if found.text_columns else "")
                    )
                columns = Columns(np.asarray(values, dtype=np.float32), {})
            else:
                columns = read_csv(args.csv, found)
            stream = not args.no_stream and columns.rows > found.max_batch_size
            started = time.perf_counter()
            results = send(stub, columns, found, args.version, args.timeout, security, stream)
            seconds = time.perf_counter() - started
    except grpc.RpcError as err:
        print(f"stablemlp predict: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (ClientError, OSError, ValueError) as err:
        print(f"stablemlp predict: {err}", file=sys.stderr)
        return 1
    print("row,probability,label")
    for i, (probability, label) in enumerate(results):
        print(f"{i},{probability:.6f},{label}")
    way = "one stream" if stream else "unary calls"
    print(f"stablemlp predict: {len(results)} rows in {seconds:.3f} s "
          f"({len(results) / max(seconds, 1e-9):,.0f} rows/s, {way})", file=sys.stderr)  # fmt: skip
    return 0


__all__ = ["build_parser", "main"]
