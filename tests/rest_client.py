"""A tiny HTTP/1.1 client for the REST tests (the standard library's http.client), so each test
controls headers, bodies and framing exactly. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

TIMEOUT_S = 10.0
MODEL_NAME = "breast_cancer"


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(base_url: str, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=TIMEOUT_S, context=context
        )
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)


def call(
    base_url: str,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    token: str = "",
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One request on a fresh connection; JSON bodies given as objects are encoded."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    connection = connect(base_url, context)
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        payload = response.read()
        found = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, found, payload)
    finally:
        connection.close()


def infer_body(rows: np.ndarray, nested: bool = False, **fields: Any) -> dict[str, Any]:
    """A JSON infer request for `rows` (NaN written as null, JSON's missing value)."""
    values = [[None if np.isnan(v) else float(v) for v in row] for row in rows.tolist()]
    data: list[Any] = values if nested else [v for row in values for v in row]
    tensor = {"name": "features", "datatype": "FP32", "shape": list(rows.shape), "data": data}
    return {"inputs": [tensor], **fields}


def binary_body(rows: np.ndarray, **fields: Any) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: a JSON header, then the rows' little-endian bytes."""
    raw = np.ascontiguousarray(rows, "<f4").tobytes()
    tensor = {"name": "features", "datatype": "FP32", "shape": list(rows.shape),
              "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor], **fields}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    return header + raw, headers


def reply_outputs(reply: Reply) -> dict[str, np.ndarray]:
    """name -> array of an infer reply, JSON data or binary data alike."""
    length = reply.headers.get("inference-header-content-length")
    header = json.loads(reply.body[: int(length)] if length else reply.body)
    binary, offset, found = reply.body[int(length or len(reply.body)) :], 0, {}
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=dtypes[output["datatype"]])
        else:
            array = np.frombuffer(binary[offset : offset + size], dtypes[output["datatype"]])
            offset += size
        found[output["name"]] = array.reshape(output["shape"])
    return found


__all__ = ["MODEL_NAME", "Reply", "binary_body", "call", "connect", "infer_body", "reply_outputs"]
