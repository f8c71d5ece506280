"""The text front of the ONNX graph: raw text columns -> category codes, ahead of the coded model.

The dynamo exporter cannot trace string operations, so the coded classifier (numbers and codes in)
is exported by torch and this front is written with onnx.helper: one ai.onnx.ml LabelEncoder per
text column (string [N, 1] -> int64 [N, 1]: each category its code, each missing marker the
missing code, anything else the "other" code), then a Concat into the codes [N, C] the coded
graph reads. Both become one graph whose inputs are `features` (if any) and the text columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from ..model.categories import CategoricalColumn
from .errors import ContractError
from .formats import CODES_NAME, INPUT_NAME, ML_DOMAIN, ML_OPSET, TEXT_ELEM_TYPE, check_onnx

# Every name inside the coded graph gets this prefix, so that no text column (an input named
# after the column) can collide with one of the exporter's internal names ("cat", "linear", ...).
PREFIX = "stablemlp/"


def lookup_nodes(columns: Sequence[CategoricalColumn], output: str) -> list[onnx.NodeProto]:
    """LabelEncoder per column (reading the input named after it), then Concat into `output`."""
    nodes, codes = [], []
    for j, column in enumerate(columns):
        table = column.table()
        codes.append(f"{PREFIX}code.{j}")
        nodes.append(
            helper.make_node(
                "LabelEncoder",
                [column.name],
                [codes[-1]],
                name=f"{PREFIX}lookup.{j}",
                domain=ML_DOMAIN,
                keys_strings=list(table),
                values_int64s=list(table.values()),
                default_int64=column.other,
            )
        )
    nodes.append(helper.make_node("Concat", codes, [output], name=f"{PREFIX}codes", axis=1))
    return nodes


def attach_text_front(
    coded: onnx.ModelProto, columns: Sequence[CategoricalColumn]
) -> onnx.ModelProto:
    """A new model: the text lookup in front of `coded` (inputs `features`? and `codes`).

    Inputs become `features` (when the coded graph has it), then one string [N, 1] tensor per
    column, named after it; outputs are unchanged. Checked against the contract before return.
    """
    model = onnx.ModelProto()
    model.CopyFrom(coded)
    graph = model.graph
    onnx.compose.add_prefix_graph(
        graph, PREFIX, rename_inputs=False, rename_outputs=False, inplace=True
    )
    inputs = {value.name: value for value in graph.input}
    if CODES_NAME not in inputs:
        raise ContractError(f"the coded graph has no {CODES_NAME!r} input")
    internal = PREFIX + CODES_NAME
    for node in graph.node:
        node.input[:] = [internal if name == CODES_NAME else name for name in node.input]
    batch = inputs[CODES_NAME].type.tensor_type.shape.dim[0].dim_param or "batch"
    kept = [inputs[INPUT_NAME]] if INPUT_NAME in inputs else []
    text = [helper.make_tensor_value_info(c.name, TEXT_ELEM_TYPE, [batch, 1]) for c in columns]
    del graph.input[:]
    graph.input.extend([*kept, *text])
    nodes = [*lookup_nodes(columns, internal), *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(opset.domain == ML_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    n_features = kept[0].type.tensor_type.shape.dim[1].dim_value if kept else 0
    check_onnx(model, n_features, [c.name for c in columns])
    return model


__all__ = ["PREFIX", "attach_text_front", "lookup_nodes"]
