#!/usr/bin/env bash
# Idempotent environment setup: creates .venv, installs torch==2.13.0 first (so pip does not
# pull a CUDA build on CPU machines), then the package in editable mode with its dev extra.
# A re-run on a ready venv only checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.lit_icl_setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# litdata (the stream extra) without torchvision: PyPI's torchvision is a CUDA build that breaks
# `import lightning` on a CPU torch, and litdata imports it only for images; its other requirements:
"$VENV/bin/python" -m pip install -q boto3 obstore requests "urllib3>=1.26" lightning-utilities filelock numpy
"$VENV/bin/python" -m pip install -q --no-deps "$(grep -o 'litdata==[0-9.]*' pyproject.toml)"
echo "$want" > "$stamp"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, lightning, litdata; print("torch", torch.__version__, "lightning", lightning.__version__, "litdata", litdata.__version__)'))"
