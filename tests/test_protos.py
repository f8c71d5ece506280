"""Wire facts of the committed stubs, checked by field number through their descriptors.

Numbers and types come from the Open Inference Protocol specification and Triton's
`grpc_service.proto` / `model_config.proto`; a renumbered field breaks stock clients silently.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from stablemlp.protos import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

_TYPE = FieldDescriptor  # the TYPE_* constants


@pytest.mark.parametrize(
    ("message", "name", "number", "type_", "repeated"),
    [
        (grpc_service_pb2.ModelInferRequest, "raw_input_contents", 7, _TYPE.TYPE_BYTES, True),
        (grpc_service_pb2.ModelInferRequest, "inputs", 5, _TYPE.TYPE_MESSAGE, True),
        (grpc_service_pb2.ModelInferRequest, "outputs", 6, _TYPE.TYPE_MESSAGE, True),
        (grpc_service_pb2.ModelInferResponse, "raw_output_contents", 6, _TYPE.TYPE_BYTES, True),
        (grpc_service_pb2.InferTensorContents, "fp32_contents", 6, _TYPE.TYPE_FLOAT, True),
        (grpc_service_pb2.InferTensorContents, "int64_contents", 3, _TYPE.TYPE_INT64, True),
        (grpc_service_pb2.InferTensorContents, "bytes_contents", 8, _TYPE.TYPE_BYTES, True),
        (grpc_service_pb2.InferParameter, "double_param", 4, _TYPE.TYPE_DOUBLE, False),
        (grpc_service_pb2.InferParameter, "uint64_param", 5, _TYPE.TYPE_UINT64, False),
        (grpc_service_pb2.ModelStreamInferResponse, "error_message", 1, _TYPE.TYPE_STRING, False),
        (grpc_service_pb2.ModelStreamInferResponse, "infer_response", 2, _TYPE.TYPE_MESSAGE, False),
        (grpc_service_pb2.ModelStatistics, "inference_stats", 6, _TYPE.TYPE_MESSAGE, False),
        (grpc_service_pb2.ModelStatistics, "response_stats", 9, _TYPE.TYPE_MESSAGE, True),
        (grpc_service_pb2.StatisticDuration, "ns", 2, _TYPE.TYPE_UINT64, False),
        (grpc_service_pb2.RepositoryModelLoadRequest, "model_name", 2, _TYPE.TYPE_STRING, False),
        (model_config_pb2.ModelConfig, "max_batch_size", 4, _TYPE.TYPE_INT32, False),
        (model_config_pb2.ModelConfig, "backend", 17, _TYPE.TYPE_STRING, False),
        (model_config_pb2.ModelConfig, "dynamic_batching", 11, _TYPE.TYPE_MESSAGE, False),
        (model_config_pb2.ModelConfig, "instance_group", 7, _TYPE.TYPE_MESSAGE, True),
        (model_config_pb2.ModelInput, "dims", 4, _TYPE.TYPE_INT64, True),
        (model_config_pb2.ModelOutput, "label_filename", 4, _TYPE.TYPE_STRING, False),
        (model_config_pb2.ModelInstanceGroup, "kind", 4, _TYPE.TYPE_ENUM, False),
    ],
)
def test_field_number_and_type(
    message: type[Message], name: str, number: int, type_: int, repeated: bool
) -> None:
    field = message.DESCRIPTOR.fields_by_name[name]
    assert (field.number, field.type) == (number, type_)
    assert field.is_repeated is repeated


def test_metadata_response_has_no_field_6() -> None:
    # OIP's `properties` and MLServer's `parameters` disagree on field 6; Triton has neither.
    descriptor = grpc_service_pb2.ModelMetadataResponse.DESCRIPTOR
    assert sorted(f.number for f in descriptor.fields) == [1, 2, 3, 4, 5]
    tensor = grpc_service_pb2.ModelMetadataResponse.TensorMetadata.DESCRIPTOR
    assert sorted(f.name for f in tensor.fields) == ["datatype", "name", "shape"]


def test_data_type_enum_matches_triton() -> None:
    values = model_config_pb2.DataType.items()
    assert values[0] == ("TYPE_INVALID", 0)
    assert model_config_pb2.TYPE_FP32 == 11
    assert model_config_pb2.TYPE_INT64 == 9
    assert model_config_pb2.TYPE_STRING == 13
    assert model_config_pb2.TYPE_BF16 == 14
    assert [number for _, number in values] == list(range(15))


def test_service_name_and_rpcs() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(service.methods_by_name) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    config = service.methods_by_name["ModelConfig"]
    config_type = config.output_type.fields_by_name["config"].message_type
    assert config_type is not None
    assert config_type.full_name == "inference.ModelConfig"
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")


def test_model_config_parses_triton_text_format() -> None:
    from google.protobuf import text_format

    text = """
    name: "breast_cancer"
    backend: "onnxruntime"
    max_batch_size: 64
    input [{ name: "features" data_type: TYPE_FP32 dims: [30] }]
    output [{ name: "probability" data_type: TYPE_FP32 dims: [1] }]
    instance_group [{ kind: KIND_CPU count: 1 }]
    dynamic_batching { max_queue_delay_microseconds: 100 }
    """
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.input[0].dims) == [30]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
