"""Refuse an ONNX model that would make ONNX Runtime read a file: checked on model.onnx's bytes,
before a session is made from them, at every load and in `stablemlp verify`.

ONNX Runtime reads files a graph names: a tensor with external data (`data_location = EXTERNAL`,
or `external_data` entries; a relative `location` is resolved against the server's working
directory when the session is made from bytes, and `*/_ORT_MEM_ADDR_/*` reads process memory), and
nodes whose attributes are file paths (`EPContext`'s `ep_cache_context`). So every tensor is
looked at, wherever one can sit: graph initializers, sparse initializers, node attributes (one
tensor, a list, sparse ones), subgraphs (If/Loop/Scan bodies), local functions and training
graphs. Nodes must come from the standard ONNX domains or the model's own functions: custom
operators are where attributes name files.

The `onnx` package is not a serving dependency, so the ModelProto is read at the wire level
(protowire.py) with the field numbers of onnx/onnx.proto3 (ONNX 1.17, IR version 10).
"""

from __future__ import annotations

from ..errors import ContractError
from ..manifest import MODEL_FILE
from ..protowire import GROUP_START, LENGTH, VARINT, WireError, fields

# The domains our exports use (standard operators and ONNX-ML); "ai.onnx" is "" spelled out.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
FILE_OPERATORS = frozenset({"EPContext"})  # ONNX Runtime's node whose attribute is a file path
MAX_DEPTH = 64  # graphs nested in attributes; ONNX Runtime's protobuf parser allows 100 levels
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Field numbers (onnx.proto3).
MODEL_GRAPH, MODEL_TRAINING, MODEL_FUNCTIONS = 7, 20, 25
TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto: initialization, algorithm
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE = 1, 5, 15
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 4, 5, 7
FUNCTION_NODE, FUNCTION_DOMAIN, FUNCTION_ATTRIBUTE = 7, 10, 11
ATTR_TENSORS = (5, 10)  # t, tensors
ATTR_GRAPHS = (6, 11)  # g, graphs
ATTR_SPARSE = (22, 23)  # sparse_tensor, sparse_tensors
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, TENSOR_NAME = 13, 14, 8
SPARSE_PARTS = (1, 2)  # SparseTensorProto: values, indices


class _Walk:
    """One model's walk; `where` names the path to what is refused."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.domains = set(STANDARD_DOMAINS)

    def text(self, start: int, end: int) -> str:
        return self.data[start:end].decode("utf-8", "replace")

    def model(self) -> None:
        data = self.data
        # Local functions first: their domains are the ones a node may call besides the standard.
        for number, kind, start, end in fields(data):
            if number == MODEL_FUNCTIONS and kind == LENGTH:
                for inner, inner_kind, value, after in fields(data, start, end):
                    if inner == FUNCTION_DOMAIN and inner_kind == LENGTH:
                        self.domains.add(self.text(value, after))
        for number, kind, start, end in fields(data):
            if kind != LENGTH:
                continue
            if number == MODEL_GRAPH:
                self.graph(start, end, "graph", 0)
            elif number == MODEL_TRAINING:
                for inner, inner_kind, value, after in fields(data, start, end):
                    if inner in TRAINING_GRAPHS and inner_kind == LENGTH:
                        self.graph(value, after, "training_info", 0)
            elif number == MODEL_FUNCTIONS:
                self.function(start, end)

    def function(self, start: int, end: int) -> None:
        for number, kind, value, after in fields(self.data, start, end):
            if kind != LENGTH:
                continue
            if number == FUNCTION_NODE:
                self.node(value, after, "functions", 0)
            elif number == FUNCTION_ATTRIBUTE:
                self.attribute(value, after, "functions", 0)

    def graph(self, start: int, end: int, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ContractError(f"{MODEL_FILE} {where}: graphs nested deeper than {MAX_DEPTH}")
        for number, kind, value, after in fields(self.data, start, end):
            if kind != LENGTH:
                continue
            if number == GRAPH_NODE:
                self.node(value, after, where, depth)
            elif number == GRAPH_INITIALIZER:
                self.tensor(value, after, f"{where} initializer")
            elif number == GRAPH_SPARSE:
                self.sparse(value, after, f"{where} sparse_initializer")

    def node(self, start: int, end: int, where: str, depth: int) -> None:
        op_type = domain = ""
        attributes = []
        for number, kind, value, after in fields(self.data, start, end):
            if kind != LENGTH:
                continue
            if number == NODE_OP_TYPE:
                op_type = self.text(value, after)
            elif number == NODE_DOMAIN:
                domain = self.text(value, after)
            elif number == NODE_ATTRIBUTE:
                attributes.append((value, after))
        if domain not in self.domains or op_type in FILE_OPERATORS:
            shown = f"{domain}:{op_type}" if domain else op_type
            raise ContractError(
                f"{MODEL_FILE} {where}: operator '{shown[:128]}' is not allowed, expected standard "
                f"ONNX operators (domains {sorted(STANDARD_DOMAINS)}) or the model's own functions"
            )
        for value, after in attributes:
            self.attribute(value, after, f"{where} node {op_type[:64]}", depth)

    def attribute(self, start: int, end: int, where: str, depth: int) -> None:
        for number, kind, value, after in fields(self.data, start, end):
            if kind != LENGTH:
                continue
            if number in ATTR_TENSORS:
                self.tensor(value, after, f"{where} attribute")
            elif number in ATTR_SPARSE:
                self.sparse(value, after, f"{where} attribute")
            elif number in ATTR_GRAPHS:
                self.graph(value, after, f"{where} subgraph", depth + 1)

    def sparse(self, start: int, end: int, where: str) -> None:
        for number, kind, value, after in fields(self.data, start, end):
            if number in SPARSE_PARTS and kind == LENGTH:
                self.tensor(value, after, where)

    def tensor(self, start: int, end: int, where: str) -> None:
        name, external = "", False
        for number, kind, value, after in fields(self.data, start, end):
            if number == TENSOR_NAME and kind == LENGTH:
                name = self.text(value, after)
            elif number == TENSOR_EXTERNAL_DATA or (
                number == TENSOR_DATA_LOCATION and kind == VARINT and value == EXTERNAL
            ):
                external = True
            elif kind == GROUP_START and number in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
                external = True  # a malformed encoding of the same fields: refused alike
        if external:
            raise ContractError(
                f"{MODEL_FILE} {where} '{name[:64]}': its data is in an external file, expected "
                "every tensor inside model.onnx (ONNX external data is not served)"
            )


def refuse_file_references(model: bytes) -> None:
    """Raise ContractError if the serialized ModelProto `model` makes ONNX Runtime open a file,
    or cannot be read as protobuf."""
    try:
        _Walk(model).model()
    except WireError as err:
        raise ContractError(f"{MODEL_FILE}: not an ONNX protobuf ({err})") from None


__all__ = ["FILE_OPERATORS", "STANDARD_DOMAINS", "refuse_file_references"]
