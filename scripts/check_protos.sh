#!/usr/bin/env bash
# CI check: regenerate protos/ stubs and fail if they differ from the committed ones (or if
# generation produced files git does not know about). Run from the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
scripts/gen_protos.sh

if ! git diff --exit-code -- protos/; then
  echo "protos/: committed stubs differ from scripts/gen_protos.sh output; regenerate and commit" >&2
  exit 1
fi
untracked="$(git ls-files --others --exclude-standard -- protos/)"
if [[ -n "$untracked" ]]; then
  echo "protos/: files not committed:" >&2
  echo "$untracked" >&2
  exit 1
fi
echo "protos/: stubs up to date"
