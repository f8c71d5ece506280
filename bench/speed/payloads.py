"""The benchmark's inputs for any model the manifest contract allows: an FP32 matrix of numbers and
text columns (BYTES), as feeds for in-process ONNX Runtime and as ModelInfer requests, and back.

Text values cycle through the column's vocabulary (from the manifest), an unseen value and a
missing one, so a text model's benchmark pays for every lookup path the served graph has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...protos import grpc_service_pb2 as pb

Feeds = dict[str, np.ndarray]
_PREFIX = 4  # bytes of a raw BYTES element's little-endian length


def _vocabulary(manifest: Mapping[str, Any], column: str) -> list[str]:
    for entry in manifest.get("columns", ()):
        if entry.get("name") == column and entry.get("categories"):
            return [str(c) for c in entry["categories"]]
    return ["a", "b"]


def make_feeds(manifest: Mapping[str, Any], batch: int, seed: int = 0) -> Feeds:
    """Seeded rows for every input: finite numbers (an MLP's cost does not depend on them) and
    text from the vocabulary, plus one unseen and one missing value."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in manifest["inputs"]:
        width = int(spec["shape"][1])
        if spec["datatype"] == "FP32":
            feeds[spec["name"]] = rng.normal(size=(batch, width)).astype(np.float32)
        else:
            values = [*_vocabulary(manifest, spec["name"]), "never seen", ""]
            picked = [values[int(i)] for i in rng.integers(len(values), size=batch * width)]
            feeds[spec["name"]] = np.array(picked, dtype=object).reshape(batch, width)
    return feeds


def build_request(model: str, manifest: Mapping[str, Any], feeds: Feeds, form: str) -> Any:
    """A ModelInferRequest of `feeds` in `form` (raw_input_contents or the typed contents)."""
    request = pb.ModelInferRequest(model_name=model, id="bench")
    raw = form == "raw_input_contents"
    for spec in manifest["inputs"]:
        array = feeds[spec["name"]]
        tensor = request.inputs.add(name=spec["name"], datatype=spec["datatype"],
                                    shape=list(array.shape))  # fmt: skip
        if spec["datatype"] == "FP32":
            if raw:
                request.raw_input_contents.append(np.ascontiguousarray(array, "<f4").tobytes())
            else:
                tensor.contents.fp32_contents.extend(array.ravel().tolist())
            continue
        items = [str(v).encode("utf-8") for v in array.ravel()]
        if raw:
            request.raw_input_contents.append(
                b"".join(len(i).to_bytes(_PREFIX, "little") + i for i in items)
            )
        else:
            tensor.contents.bytes_contents.extend(items)
    return request


def feeds_of(request: Any) -> Feeds:
    """A request's inputs back as feeds (what the model floor and the reply checks run)."""
    feeds: Feeds = {}
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        data = request.raw_input_contents[i] if request.raw_input_contents else None
        if tensor.datatype == "FP32":
            if data is None:  # one packed fp32 field: its tag and length, then the values
                body = tensor.contents.SerializeToString()
                data = body[len(body) - 4 * int(np.prod(shape)) :]
            feeds[tensor.name] = np.ndarray(shape, np.float32, data)
            continue
        if data is None:
            items = list(tensor.contents.bytes_contents)
        else:
            items, pos = [], 0
            while pos < len(data):
                length = int.from_bytes(data[pos : pos + _PREFIX], "little")
                items.append(data[pos + _PREFIX : pos + _PREFIX + length])
                pos += _PREFIX + length
        values = [item.decode("utf-8").strip() for item in items]
        feeds[tensor.name] = np.array(values, dtype=object).reshape(shape)
    return feeds


__all__ = ["Feeds", "build_request", "feeds_of", "make_feeds"]
