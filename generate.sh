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
# betterproto2-compiler skips a package's empty __init__.py when that path exists relative to the working
# directory (here orders/__init__.py, our own package), so add any that are missing: the output must not depend
# on where it is generated, and setuptools' find_packages needs every level to be a package.
find "$out" -type d ! -name __pycache__ -exec sh -c '[ -e "$1/__init__.py" ] || : >"$1/__init__.py"' _ {} \;
