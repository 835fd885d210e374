#!/usr/bin/env bash
# Regenerate orders/_proto/ from order.proto with betterproto2 (grpclib stubs, Google descriptors
# for server reflection). Needs the [dev] extra: betterproto2-compiler, grpcio-tools, ruff.
set -euo pipefail
cd "$(dirname "$0")"
out=orders/_proto
rm -rf "$out"
mkdir -p "$out"
python -m grpc_tools.protoc -I . \
  --python_betterproto2_out="$out" \
  --python_betterproto2_opt=client_generation=async,server_generation=async,google_protobuf_descriptors \
  order.proto
