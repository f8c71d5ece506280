"""MLServer's side of `stablemlp bench --peers mlserver`: a custom inference runtime, imported by
MLServer in the peer's own environment, never by stablemlp (mlserver is not installed there).

MLServer's documented custom runtime (docs/user-guide/custom.md, docs/examples/custom): an
`MLModel` whose load() finds its artifact with `get_model_uri` and whose predict() decodes the
request with MLServer's NumPy codec and encodes the outputs with it. The benchmark copies this file
next to the model-settings.json it writes (`"implementation": "peer_mlserver.OnnxModel"`) and runs
`.venv-mlserver/bin/mlserver start FOLDER` with a settings.json that binds 127.0.0.1 on free
ports; every other setting is MLServer's default.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):  # type: ignore[misc]  # mlserver is untyped here
    """The exported model.onnx, one ONNX Runtime session made as `stablemlp serve` makes its own
    (one intra-op and one inter-op thread, all graph optimizations)."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = await get_model_uri(self._settings)
        self._session: Any = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        probability, label = self._session.run(["probability", "label"], {self._input: rows})
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output("probability", probability),
                NumpyCodec.encode_output("label", label),
            ],
        )
