"""Triton's ModelConfig and ModelStatistics, built from a loaded version's facts as plain data in
the shape of Triton's JSON (proto field names, enums by name, 64-bit integers as numbers, as
Triton's REST writes them and perf_analyzer reads them). REST writes these documents as they are;
the gRPC front parses them into its messages (grpc/servicer.py), so no protocol library is needed
here and the two fronts cannot drift apart.

Stock clients see the model's own facts where Triton's messages have room for them, since
ModelMetadataResponse has no free-form field: ModelConfig.parameters carries `providers`,
`feature_names` (JSON list: the columns of the FP32 input), `text_columns` (JSON list: the BYTES
inputs), `threshold`, `sha256`, `opset` and ONNX Runtime's thread counts, and instance_group says
CPU or GPU.
"""

from __future__ import annotations

import json
from typing import Any

from .datatypes import DATATYPES
from .manifest import MODEL_FILE, PLATFORM
from .observe.telemetry import Duration, VersionStats
from .repository.models import Loaded
from .repository.policy import VersionPolicy
from .runtime.batcher import BatchingOptions
from .runtime.session import CUDA

Document = dict[str, Any]


def _duration(d: Duration) -> Document:
    return {"count": d.count, "ns": d.ns}


_ZERO = Duration()


def model_statistics(name: str, version: int, stats: VersionStats) -> Document:
    """Triton's ModelStatistics from the counters /metrics also reads; every field is written,
    zeros too (Triton's REST does; a client summing counters must not meet a missing key)."""
    return {
        "name": name, "version": str(version), "last_inference": stats.last_inference,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success), "fail": _duration(stats.fail),
            "queue": _duration(stats.queue), "compute_input": _duration(stats.compute_input),
            "compute_infer": _duration(stats.compute_infer),
            "compute_output": _duration(stats.compute_output),
            "cache_hit": _duration(_ZERO), "cache_miss": _duration(_ZERO),  # no response cache
        },
        "batch_stats": [
            {
                "batch_size": rows, "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for rows, b in sorted(dict(stats.batches).items())
        ],
        "memory_usage": [],
        "response_stats": {},  # decoupled models only
    }  # fmt: skip


def _version_policy(policy: VersionPolicy) -> Document:
    if policy.kind == "latest":
        return {"latest": {"num_versions": policy.count}}
    if policy.kind == "all":
        return {"all": {}}
    return {"specific": {"versions": list(policy.versions)}}


def model_config(
    loaded: Loaded, policy: VersionPolicy, batching: BatchingOptions | None = None
) -> Document:
    """Triton's shape: batch dim implicit (max_batch_size > 0), so dims drop the leading -1.
    Fields at their defaults are left out, as protobuf's JSON does."""
    runtime = loaded.live.runtime
    manifest = runtime.manifest
    on_gpu = runtime.providers[0] == CUDA

    def tensors(specs: Any) -> list[Document]:
        return [
            {"name": s.name, "data_type": DATATYPES[s.datatype].config_name, "dims": s.shape[1:]}
            for s in specs
        ]

    group: Document = {"name": loaded.name, "count": 1}
    group["kind"] = "KIND_GPU" if on_gpu else "KIND_CPU"
    if on_gpu:
        group["gpus"] = [runtime.options.cuda_device_id]
    config: Document = {
        "name": loaded.name, "platform": PLATFORM,
        "version_policy": _version_policy(policy),
        "max_batch_size": runtime.max_batch_size,
        "input": tensors(manifest.inputs), "output": tensors(manifest.outputs),
    }  # fmt: skip
    if batching is not None:
        dynamic: Document = {"max_queue_delay_microseconds": batching.max_queue_delay_us}
        if batching.preferred_batch_sizes:
            dynamic["preferred_batch_size"] = list(batching.preferred_batch_sizes)
        config["dynamic_batching"] = dynamic
    config["instance_group"] = [group]
    config["default_model_filename"] = MODEL_FILE
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
    config["parameters"] = {key: {"string_value": value} for key, value in parameters.items()}
    config["backend"] = "onnxruntime"
    return config


__all__ = ["Document", "model_config", "model_statistics"]
