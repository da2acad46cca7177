#!/usr/bin/env bash
# Generates every Python module from protos/: messages, gRPC stubs and type stubs.
# Generated files are never edited by hand; `make proto` runs this script, and CI
# fails when the checked-in output is stale.
#
# Where the output goes: the proto file's path below its include root decides the
# Python import path of the generated code, so
#   protos/twopc/v1/*.proto           -> src/twopc/v1/        (import twopc.v1...)
#   protos/{wallet,order,shop}/v1/*.proto -> services/*/v1/   (import services.wallet.v1...)
# The services' protos are mapped under the virtual include path "services" for that.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"  # protoc finds the mypy-protobuf plugins here

OUT=(src/twopc/v1 services/wallet/v1 services/order/v1 services/shop/v1)
rm -rf "${OUT[@]}"
mkdir -p "${OUT[@]}"

gen() { # out_dir include_root files...
  local out=$1 inc=$2; shift 2
  "$PY" -m grpc_tools.protoc -I"$inc" \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" "$@"
}
gen src protos protos/twopc/v1/*.proto
gen . services=protos $(cd protos && ls wallet/v1/*.proto order/v1/*.proto shop/v1/*.proto | sed "s|^|services/|")

for d in "${OUT[@]}"; do
  printf '"""Generated from protos/ by scripts/gen_protos.sh. DO NOT EDIT."""\n' > "$d/__init__.py"
done
