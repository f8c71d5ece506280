"""Running a model version: session (one ONNX Runtime session; graph_files refuses a graph naming a
file), batcher and scheduler (which rows run together, and where), admission (in-flight bounds).
Imports neither grpc nor the protos.
"""
