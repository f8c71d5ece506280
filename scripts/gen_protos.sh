#!/usr/bin/env bash
# Regenerate the committed Python stubs in protos/ from protos/*.proto.
# Run from the repository root. Needs grpcio-tools==1.75.1 (pinned in pyproject's dev extra), so the
# stubs carry gencode 6.31.1: they load with protobuf >= 6.31.1 and grpcio >= 1.75.1.
# The interpreter is $PYTHON (default: python).
#
# The stubs import each other as `stablemlp.protos.*`, the installed package's name for protos/:
# protoc derives that from the .proto paths, so it runs on a view of the checkout named
# `stablemlp` (a symlink under build/, which is ignored).
set -euo pipefail

PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

view=build/protoc
mkdir -p "$view"
ln -sfn ../.. "$view/stablemlp"
"$PYTHON" -m grpc_tools.protoc -I"$view" \
  --python_out="$view" --pyi_out="$view" --grpc_python_out="$view" \
  "$view"/stablemlp/protos/*.proto
