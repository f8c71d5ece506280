"""Triton's ModelConfig and ModelStatistics messages, built from a loaded version's facts.

Stock clients see the model's own facts where Triton's messages have room for them, since
ModelMetadataResponse has no free-form field: ModelConfig.parameters carries `providers`,
`feature_names` (JSON list: the columns of the FP32 input), `text_columns` (JSON list: the BYTES
inputs), `threshold`, `sha256`, `opset` and ONNX Runtime's thread counts, and instance_group says
CPU or GPU. Shared by both fronts (REST returns the same messages as JSON).
"""

from __future__ import annotations

import json

from ..protos import grpc_service_pb2 as pb
from ..protos import model_config_pb2 as mc
from .datatypes import DATATYPES
from .manifest import MODEL_FILE, PLATFORM
from .observe.telemetry import Duration, VersionStats
from .repository.models import Loaded
from .repository.policy import VersionPolicy
from .runtime.batcher import BatchingOptions
from .runtime.session import CUDA


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(name: str, version: int, stats: VersionStats) -> pb.ModelStatistics:
    """Triton's ModelStatistics from the counters /metrics also reads."""
    return pb.ModelStatistics(
        name=name, version=str(version), last_inference=stats.last_inference,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail),
            queue=_duration(stats.queue), compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=rows, compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for rows, b in sorted(dict(stats.batches).items())
        ],
    )  # fmt: skip


def model_config(
    loaded: Loaded, policy: VersionPolicy, batching: BatchingOptions | None = None
) -> mc.ModelConfig:
    """Triton's shape: batch dim implicit (max_batch_size > 0), so dims drop the leading -1."""
    runtime = loaded.live.runtime
    manifest = runtime.manifest
    on_gpu = runtime.providers[0] == CUDA
    config = mc.ModelConfig(
        name=loaded.name, platform=PLATFORM, backend="onnxruntime",
        max_batch_size=runtime.max_batch_size, default_model_filename=MODEL_FILE,
    )  # fmt: skip
    if policy.kind == "latest":
        config.version_policy.latest.num_versions = policy.count
    elif policy.kind == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(policy.versions)
    for spec in manifest.inputs:
        config.input.add(
            name=spec.name, data_type=DATATYPES[spec.datatype].config_type, dims=spec.shape[1:]
        )
    for spec in manifest.outputs:
        config.output.add(
            name=spec.name, data_type=DATATYPES[spec.datatype].config_type, dims=spec.shape[1:]
        )
    if batching is not None:
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    group = config.instance_group.add(name=loaded.name, count=1)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    if on_gpu:
        group.gpus.append(runtime.options.cuda_device_id)
    parameters = {
        "providers": ",".join(runtime.providers),
        "feature_names": json.dumps(list(manifest.feature_names)),
        "text_columns": json.dumps(list(manifest.text_columns)),
        "threshold": repr(manifest.threshold),
        "sha256": manifest.files[MODEL_FILE].sha256,
        "opset": str(manifest.opset),
        "intra_op_thread_count": str(runtime.options.intra_op_threads),
        "inter_op_thread_count": str(runtime.options.inter_op_threads),
        "inline_max_rows": str(runtime.inline_rows),  # runs on the event loop up to this size
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


__all__ = ["model_config", "model_statistics"]
