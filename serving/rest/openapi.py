"""The REST front's OpenAPI 3.1 document, served at GET /v2/openapi.json.

Written from the KServe v2 / Open Inference Protocol REST spec and Triton's HTTP extensions
(model repository, configuration, statistics, binary tensor data) as this server implements them;
tests/test_rest.py checks that every route the server has is here and that real replies match
these schemas.
"""

from __future__ import annotations

from typing import Any

from ..datatypes import DATATYPES

JSON = "application/json"
REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _reply(description: str, schema: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {JSON: {"schema": _ref(schema)}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "bad request (the message names the field, got, expected)",
             401: "missing or wrong bearer token", 404: "unknown model or version",
             408: "request body not received within --client-timeout-s",
             413: "request body over the size limit",
             429: "over --max-inflight, or over the requests or body bytes handled at once: "
                  "retry later",
             500: "unexpected error (fixed message; details in the server log)",
             503: "not ready, draining for shutdown, or over --max-connections: retry "
                  "elsewhere"}  # fmt: skip
    return {
        str(s): {"description": words[s], "content": {JSON: {"schema": _ref("Error")}}}
        for s in statuses
    }


def _get(summary: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {**ok, **_errors(401, 500, *errors)}}}


NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
TENSOR_META: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
DATA = {
    "description": "row-major values, flat or nested; "
    + "; ".join(f"{name}: {DATATYPES[name].json}" for name in ("FP32", "INT64", "BOOL", "BYTES")),
    "type": "array",
}
PARAMETERS = {"type": "object", "additionalProperties": True}
DURATION = {
    "type": "object",
    "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}},
}
# A tensor with its values: an inference request's input and a reply's output are alike.
TENSOR_DATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        **TENSOR_META["properties"],
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        "data": DATA,
    },
}
SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": TENSOR_META},
            "outputs": {"type": "array", "items": TENSOR_META},
        },
    },
    "RequestInput": TENSOR_DATA,
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data": {"type": "boolean"}},
            },
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": {"type": "boolean"}},
            },
            "inputs": {"type": "array", "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": TENSOR_DATA,
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
    "ModelConfig": {
        "description": "Triton's ModelConfig (model_config.proto) as JSON, 64-bit integers as "
        "numbers; parameters carry providers, feature_names, text_columns, threshold, sha256",
        "type": "object",
        "required": ["name", "platform", "max_batch_size", "input", "output"],
        "properties": {
            "name": {"type": "string"},
            "platform": {"type": "string"},
            "max_batch_size": {"type": "integer"},
            "input": {"type": "array", "items": PARAMETERS},
            "output": {"type": "array", "items": PARAMETERS},
            "parameters": PARAMETERS,
        },
    },
    "ModelStatistics": {
        "description": "Triton's ModelStatisticsResponse as JSON (integers as numbers)",
        "type": "object",
        "required": ["model_stats"],
        "properties": {
            "model_stats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "version"],
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "last_inference": {"type": "integer"},
                        "inference_count": {"type": "integer"},
                        "execution_count": {"type": "integer"},
                        "inference_stats": {"type": "object", "additionalProperties": DURATION},
                        "batch_stats": {"type": "array", "items": PARAMETERS},
                    },
                },
            }
        },
    },
    "RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "version", "state", "reason"],
            "properties": {k: {"type": "string"} for k in ("name", "version", "state", "reason")},
        },
    },
    "Empty": {"type": "object"},
}


def _model_paths(base: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    infer_body = {
        "required": True,
        "content": {
            JSON: {"schema": _ref("InferenceRequest")},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: the JSON header (its length in "
                "the Inference-Header-Content-Length header), then each input's bytes",
            },
        },
    }
    infer_ok = _reply("outputs; binary ones after the JSON header (Inference-Header-Content-"
                      "Length says where it ends)", "InferenceResponse")  # fmt: skip
    return {
        base: {**_get("model metadata", _reply("metadata", "ModelMetadata"), 404, 503),
               "parameters": parameters},
        base + "/ready": {
            **_get("model readiness", {**_reply("ready", "Ready"),
                                       **_reply("not ready", "Ready", "503")}),
            "parameters": parameters,
        },
        base + "/config": {**_get("Triton model configuration", _reply("configuration",
                           "ModelConfig"), 404, 503), "parameters": parameters},
        base + "/stats": {**_get("Triton statistics", _reply("statistics", "ModelStatistics"),
                          404, 503), "parameters": parameters},
        base + "/infer": {
            "parameters": parameters,
            "post": {"summary": "inference", "requestBody": infer_body,
                     "responses": {**infer_ok, **_errors(400, 401, 404, 408, 413, 429, 500, 503)}},
        },
    }  # fmt: skip


def openapi_document(server_version: str) -> dict[str, Any]:
    control = {
        "responses": {**_reply("done", "Empty"), **_errors(400, 401, 404, 500)},
        "description": "needs the control token and --model-control-mode explicit",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stablemlp: KServe v2 / Open Inference Protocol REST",
            "version": server_version,
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v2/health/live": {
                **_get("liveness (no token when --auth-exempt-health)", _reply("live", "Live"))
            },
            "/v2/health/ready": {
                **_get(
                    "readiness: every model ready, not draining",
                    {**_reply("ready", "Ready"), **_reply("not ready", "Ready", "503")},
                )
            },
            "/v2": _get("server metadata", _reply("metadata", "ServerMetadata")),
            "/v2/openapi.json": _get("this document", {"200": {"description": "OpenAPI 3.1"}}),
            "/v2/models/stats": _get(
                "statistics of every model", _reply("statistics", "ModelStatistics")
            ),
            **_model_paths("/v2/models/{name}", [NAME]),
            **_model_paths("/v2/models/{name}/versions/{version}", [NAME, VERSION]),
            "/v2/repository/index": {
                "post": {
                    "summary": 'every model and version with its state (body {"ready": true} '
                    "for ready ones only)",
                    "responses": {**_reply("index", "RepositoryIndex"), **_errors(400, 401, 500)},
                }
            },
            "/v2/repository/models/{name}/load": {
                "parameters": [NAME],
                "post": {"summary": "load", **control},
            },
            "/v2/repository/models/{name}/unload": {
                "parameters": [NAME],
                "post": {"summary": "unload", **control},
            },
        },
    }


__all__ = ["SCHEMAS", "openapi_document"]
