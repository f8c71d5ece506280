"""A client of a running server: calls (`predict`, its requests and streams over gRPC), columns
(rows, records, data frames and CSV files matched to a model's columns), cli (`stablemlp predict`).
"""

from .calls import ClientError, Security, predict

__all__ = ["ClientError", "Security", "predict"]
