"""One function per format: TorchScript bytes and an ONNX model of the folded classifier.

Both carry the preprocessing (NaN imputation, standardization, category lookup) and the threshold,
so a client sends raw columns and gets back (probability [N,1] float32, label [N,1] int64). A model
with text columns is exported on codes here; export.front puts the text lookup in front of it.
"""

from __future__ import annotations

import io
import logging
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import onnx
import torch
from torch import nn

from ..model.categories import CategoricalColumn
from ..model.lookup import with_lookup
from .errors import ContractError

# ONNX opset of the exported graph. 18 is the lowest opset the dynamo exporter emits natively
# (torch.onnx's TORCHLIB_OPSET; lower ones go through the version converter) and ONNX Runtime has
# run it since 1.14, so any recent Triton onnxruntime backend loads it.
OPSET = 18
# The ai.onnx.ml opset released with opset 18 (ONNX 1.13); its LabelEncoder (version 2) maps
# text to codes. Only graphs with text columns import it.
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 3
# Tensor names of the graph contract (serving reads them back from the manifest). Text columns
# are inputs named after the column.
INPUT_NAME = "features"
OUTPUT_NAMES = ("probability", "label")
# The category codes int64 [N, C]: an input of the exported coded graph, internal once the text
# lookup stands in front of it.
CODES_NAME = "codes"
# ONNX TensorProto element types of the contract: features/probability FLOAT, label INT64, text
# columns STRING.
INPUT_ELEM_TYPE = onnx.TensorProto.FLOAT
TEXT_ELEM_TYPE = onnx.TensorProto.STRING
OUTPUT_ELEM_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)

# torch 2.13 marks every torch.jit entry point deprecated. TorchScript is still the format a
# torch-only consumer (C++ libtorch, Triton's pytorch backend) loads without our code, so we keep
# producing it and silence exactly those messages, only around the calls that raise them.
_JIT_DEPRECATED = r"`torch\.jit\.(trace|trace_method|script|save|load)` is deprecated"
# torch.export's pytree code (used by the dynamo ONNX exporter) trips its own FutureWarning.
_PYTREE_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# Two inputs sharing the batch dimension: the exporter says it keeps one name for both.
_SHARED_AXIS = r"\W*The axis name: .* will not be used, since it shares the same shape constraints"
# Loggers the dynamo exporter chats on, capped at ERROR during export: one warning per torchvision
# op it cannot register (we use none), and INFO lines from each optimizer pass.
_EXPORTER_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
# (name, ONNX element type, values per row) of one graph input or output.
Signature = tuple[str, int, int]


Example = torch.Tensor | tuple[torch.Tensor, ...]


def _inputs(example: Example) -> tuple[torch.Tensor, ...]:
    return (example,) if isinstance(example, torch.Tensor) else tuple(example)


def to_torchscript(
    classifier: nn.Module, example: Example, columns: Sequence[CategoricalColumn] = ()
) -> bytes:
    """Trace `classifier` (eval mode) into TorchScript bytes that torch.jit.load reads alone.

    Tracing, not scripting: the forward pass has no data-dependent control flow, so the trace is
    the whole computation (threshold recorded as a constant) and loading needs none of our code.
    With text `columns`, the trace (on codes) is wrapped in the scripted text lookup
    (model.lookup): the module then takes (features, text) as lists of str, one per column.
    """
    classifier = classifier.eval()
    inputs = _inputs(example)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
            classifier, inputs
        )
        if columns:
            wrapped = with_lookup(module, columns, numeric=len(inputs) > 1)
            module = torch.jit.script(wrapped)
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
    return _strip_debug_records(buffer.getvalue())


def _strip_debug_records(archive: bytes) -> bytes:
    """Drop TorchScript's optional *.debug_pkl records from the zip archive.

    They hold the source locations of the tracing call stack: absolute paths of the exporting
    machine (its checkout, virtualenv, entry script), used only to annotate TorchScript runtime
    error messages. The loader treats them as optional; the parity check runs on these exact
    bytes, so a file that no longer loads or computes the same is never published.
    """
    source = zipfile.ZipFile(io.BytesIO(archive))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if not info.filename.endswith(".debug_pkl"):
                target.writestr(info, source.read(info))
    return output.getvalue()


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """Load TorchScript bytes (as a consumer would) in eval mode on the CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            io.BytesIO(data), map_location="cpu"
        )
    module.eval()
    return module


def to_onnx(classifier: nn.Module, example: Example) -> onnx.ModelProto:
    """Export `classifier` with torch's dynamo exporter: dynamic batch, OPSET, single file.

    dynamo=True (torch 2.13's default) rather than the legacy TorchScript-based exporter, which is
    deprecated with TorchScript; `external_data=False` keeps every weight inside the one proto.
    `example`: the numeric block, or (numeric block, codes) / (codes,) for a model with text
    columns; inputs are named `features` (float) and `codes` (int64). It should have at least 2
    rows: torch.export specializes a dimension seen as 0 or 1.
    """
    classifier = classifier.eval()
    inputs = _inputs(example)
    batch = torch.export.Dim("batch")
    names = [INPUT_NAME if t.is_floating_point() else CODES_NAME for t in inputs]
    with _quiet_onnx_exporter():
        program = torch.onnx.export(
            classifier,
            inputs,
            input_names=names,
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=(tuple({0: batch} for _ in inputs),),  # forward(*inputs)
            verbose=False,
        )
    if program is None:  # only the legacy exporter writes to a file and returns None
        raise ContractError("torch.onnx.export returned no program")
    model: onnx.ModelProto = program.model_proto
    _strip_debug_metadata(model)
    elem = {INPUT_NAME: int(INPUT_ELEM_TYPE), CODES_NAME: int(onnx.TensorProto.INT64)}
    _check(model, [(n, elem[n], int(t.shape[1])) for n, t in zip(names, inputs, strict=True)])
    return model


def _strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Clear the exporter's per-node/per-tensor metadata_props, in place.

    The dynamo exporter annotates every node and tensor with debugging aids: the Python stack
    trace (absolute paths of the exporting machine), FX node text, module scopes. They are more
    than half the file and mean nothing to a runtime. Model-level metadata is ours, kept.
    """
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        del value.metadata_props[:]
    for tensor in graph.initializer:
        del tensor.metadata_props[:]


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Silence the exporter's known, irrelevant noise; anything else still surfaces."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PYTREE_LEAFSPEC, category=FutureWarning)
            warnings.filterwarnings("ignore", message=_SHARED_AXIS, category=UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def with_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` whose metadata_props are exactly `metadata` (keys sorted)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    for key in sorted(metadata):
        entry = copy.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    return copy


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


def op_types(model: onnx.ModelProto) -> set[str]:
    """Every operator type in the main graph, its subgraphs and local functions."""
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(node.op_type)
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs]:
                    walk(sub)

    walk(model.graph)
    for function in model.functions:
        found.update(node.op_type for node in function.node)
    return found


def expected_inputs(n_features: int, text_columns: Sequence[str] = ()) -> list[Signature]:
    """The contract's inputs: `features` [N, F] when F > 0, then [N, 1] text per column."""
    numeric = [(INPUT_NAME, int(INPUT_ELEM_TYPE), n_features)] if n_features else []
    return numeric + [(name, int(TEXT_ELEM_TYPE), 1) for name in text_columns]


def check_onnx(model: onnx.ModelProto, n_features: int, text_columns: Sequence[str] = ()) -> None:
    """Raise ContractError unless `model` passes the full checker and matches the contract."""
    _check(model, expected_inputs(n_features, text_columns))


def _check(model: onnx.ModelProto, inputs: list[Signature]) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ContractError(f"onnx checker: {str(err).splitlines()[0]}") from err
    problems = _signature_problems(model, inputs)
    if "BatchNormalization" in op_types(model):
        problems.append("graph still contains a BatchNormalization node")
    wanted = {"": OPSET, "ai.onnx": OPSET, ML_DOMAIN: ML_OPSET}
    if any(
        wanted.get(opset.domain, opset.version) != opset.version for opset in model.opset_import
    ):
        problems.append(f"opset is not {OPSET} (and {ML_OPSET} for {ML_DOMAIN})")
    if problems:
        raise ContractError("; ".join(problems))


def _signature_problems(model: onnx.ModelProto, inputs: list[Signature]) -> list[str]:
    expected = inputs + [
        (name, int(elem), 1) for name, elem in zip(OUTPUT_NAMES, OUTPUT_ELEM_TYPES, strict=True)
    ]
    actual = list(model.graph.input) + list(model.graph.output)
    if [v.name for v in actual] != [name for name, _, _ in expected]:
        return [f"tensors are {[v.name for v in actual]}, expected {[n for n, _, _ in expected]}"]
    problems = []
    for value, (name, elem, width) in zip(actual, expected, strict=True):
        tensor = value.type.tensor_type
        dims = [_dim(d) for d in tensor.shape.dim]
        if tensor.elem_type != elem:
            problems.append(f"{name} has element type {tensor.elem_type}, expected {elem}")
        if len(dims) != 2 or isinstance(dims[0], int) or dims[1] != width:
            problems.append(f"{name} has shape {dims}, expected [dynamic batch, {width}]")
    return problems


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str:
    return int(dim.dim_value) if dim.HasField("dim_value") else str(dim.dim_param or "?")


__all__ = [
    "CODES_NAME",
    "INPUT_NAME",
    "ML_DOMAIN",
    "ML_OPSET",
    "OPSET",
    "OUTPUT_NAMES",
    "TEXT_ELEM_TYPE",
    "Example",
    "check_onnx",
    "expected_inputs",
    "load_torchscript",
    "metadata_of",
    "op_types",
    "to_onnx",
    "to_torchscript",
    "with_metadata",
]
