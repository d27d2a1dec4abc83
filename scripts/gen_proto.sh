#!/usr/bin/env bash
# Regenerate the checked-in gRPC Python code of the advface API from proto/advface/v1/advface.proto.
#
#   pip install -e '.[dev]' && bash scripts/gen_proto.sh
#
# protoc writes advface/v1/advface_pb2*.py (the proto package path); we move them to advface/api/v1/ and make the
# generated import of advface_pb2 package-relative, so the code works wherever the package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PYTHON" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/advface/v1/advface.proto
dest=advface/api/v1
mkdir -p "$dest"
for f in advface_pb2.py advface_pb2.pyi advface_pb2_grpc.py; do
    sed -e 's/^from advface\.v1 import advface_pb2 as/from . import advface_pb2 as/' "$out/advface/v1/$f" > "$dest/$f"
done
echo "generated $dest/advface_pb2.py, advface_pb2.pyi, advface_pb2_grpc.py with $("$PYTHON" -m grpc_tools.protoc --version)"

# the key service of encrypted matching (advface.keyservice.v1): advface/api/keyservice/v1/
"$PYTHON" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/advface/keyservice/v1/keyservice.proto
dest=advface/api/keyservice/v1
mkdir -p "$dest"
for f in keyservice_pb2.py keyservice_pb2.pyi keyservice_pb2_grpc.py; do
    sed -e 's/^from advface\.keyservice\.v1 import keyservice_pb2 as/from . import keyservice_pb2 as/' \
        "$out/advface/keyservice/v1/$f" > "$dest/$f"
done
echo "generated $dest/keyservice_pb2.py, keyservice_pb2.pyi, keyservice_pb2_grpc.py"
