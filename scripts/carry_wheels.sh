#!/usr/bin/env bash
# `make gpu-wheels`: download the cp312 manylinux wheels that a bare CUDA image with Python 3.12
# lacks into wheels/<group>/ (git-ignored), at the versions installed in this .venv (which satisfy
# pyproject.toml), and slim the two big ones. scripts/gpu_check.sh installs them offline there.
#
# Groups (one device call carries at most 64 MiB with the working tree; README "GPU check"):
#   ray   ray (slimmed) + its [default,data,train,tune] extras' deps
#   hf    transformers, trl, peft, datasets, bitsandbytes (slimmed), pydantic and their small deps
#   moto  moto[server] + boto3: the tests' `ray_local` fixture starts a moto S3 server
# Packages the image already has (torch, accelerate, tokenizers, pyarrow, numpy, ...: stack-notes §10,
# the device KINDS.md list) are not downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${WHEELS:-wheels}

RAY="ray aiohttp-cors colorful opencensus opencensus-context google-api-core google-auth
  googleapis-common-protos proto-plus pyasn1 pyasn1-modules opentelemetry-api opentelemetry-sdk
  opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-semantic-conventions smart-open
  tensorboardx jsonschema jsonschema-specifications referencing rpds-py py-spy virtualenv distlib
  platformdirs python-discovery"
HF="transformers trl peft datasets bitsandbytes dill multiprocess pydantic pydantic-core annotated-types
  typing-inspection"
MOTO="moto boto3 botocore s3transfer jmespath xmltodict responses flask flask-cors blinker itsdangerous
  cryptography cffi pycparser antlr4-python3-runtime aws-xray-sdk cfn-lint docker graphql-core joserfc
  jsonpatch jsonpath-ng jsonpointer jsonschema-path lazy-object-proxy openapi-schema-validator
  openapi-spec-validator pathable py-partiql-parser pydantic-settings python-dotenv rfc3339-validator"

pins() {  # NAME==VERSION as installed in this environment
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import version
print("\n".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
}

download() {  # GROUP NAMES...
  local group=$1
  shift
  mkdir -p "$DEST/$group"
  echo "== wheels/$group: downloading $# wheels (cp312, manylinux x86_64, no dependencies)"
  # shellcheck disable=SC2046
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d "$DEST/$group" $(pins "$@")
}

slim() {  # WHEEL PATTERN...: drop the entries matching a pattern, and their RECORD lines
  "$PY" - "$@" <<'EOF'
import fnmatch, os, sys, zipfile
path, patterns = sys.argv[1], sys.argv[2:]
with zipfile.ZipFile(path) as src:
    drop = {i.filename for i in src.infolist() if any(fnmatch.fnmatch(i.filename, p) for p in patterns)}
    if not drop:
        sys.exit(print(f"   {os.path.basename(path)}: slim already"))
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if line.split(b",")[0].decode() not in drop)
            dst.writestr(info, data)
before = os.path.getsize(path)
os.replace(path + ".tmp", path)
print(f"   {os.path.basename(path)}: dropped {len(drop)} entries, {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
}

# shellcheck disable=SC2086
download ray $RAY
# shellcheck disable=SC2086
download hf $HF
# shellcheck disable=SC2086
download moto $MOTO

echo "== slimming"
# Ray: the Java workers' jar (32 MB) and the dashboard's JavaScript source map serve no Python job.
slim "$DEST"/ray/ray-*.whl 'ray/jars/ray_dist.jar' 'ray/dashboard/client/build/static/js/*.js.map'
# bitsandbytes loads the library of torch's CUDA version: the image's torch is built for CUDA 13.0
# (KINDS.md), so CUDA 11/12, ROCm and XPU builds stay here (keep another one by editing this line).
slim "$DEST"/hf/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  'bitsandbytes/libbitsandbytes_rocm*.so' 'bitsandbytes/libbitsandbytes_xpu*.so'

echo "== sizes (a device call carries at most 64 MiB with the working tree)"
du -sm "$DEST"/* | awk '{print "   " $2 ": " $1 " MiB"}'
