#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels the lent GPU machine lacks for bench/fast_path_gpu.sh: the
# image has torch, triton, safetensors, tokenizers, jinja2, numpy, tqdm, pyyaml, httpx, prometheus-client
# and pytest, but transformers 5.17 (the parity reference is 5.23) and no FastAPI/pydantic/uvicorn.
# Run here (PyPI is reachable here, not there), then name .whl in the device call's `carry`.
# Versions are this checkout's venv's, so both machines run the same code; Python 3.12, x86-64 there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
names="transformers regex fastapi starlette pydantic pydantic_core typing_inspection typing_extensions annotated_types"
names="$names opentelemetry_api uvicorn"
pins=$($PY - $names <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir -p .whl
for pin in $pins; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
ls -l .whl && du -sh .whl
