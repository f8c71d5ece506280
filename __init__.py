"""stablemlp: a gradient-stabilized tabular MLP, trained, exported and served.

Subpackages, in pipeline order: `stablemlp.model` (network, data, training), `stablemlp.export`
(BatchNorm folding, ONNX + TorchScript, parity, publishing), `stablemlp.serving` (the KServe v2
server over ONNX Runtime, and its client), `stablemlp.protos` (generated stubs), `stablemlp.bench`.
`stablemlp.cli` is the console script. Importing this package imports nothing else (no torch).
"""

__all__: list[str] = []
