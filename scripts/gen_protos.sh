#!/usr/bin/env bash
# Regenerate the committed Python stubs in protos/ from protos/*.proto.
# Run from the repository root. Needs grpcio-tools==1.75.1 (pinned in pyproject's dev extra), so the
# stubs carry gencode 6.31.1: they load with protobuf >= 6.31.1 and grpcio >= 1.75.1.
# The interpreter is $PYTHON (default: python).
set -euo pipefail

PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

"$PYTHON" -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/*.proto
