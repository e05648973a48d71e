#!/usr/bin/env bash
# Rebuilds the bundled tiny models (models/tiny/, models/tiny-wide/) and their diffusers references
# (models/references/) from scratch. Needs the models venv:
#   python3.12 -m venv models/.venv && models/.venv/bin/pip install -r models/requirements.txt
# make_tiny.py is deterministic (fixed seeds), so this reproduces the committed files up to
# ONNX serialisation details; the parity tests must pass afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-models/.venv/bin/python}
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$py" models/make_tiny.py "$src/tiny"
rm -rf models/tiny
"$py" models/export.py "$src/tiny" models/tiny
"$py" models/make_tiny.py "$src/tiny-wide" --config models/tiny_wide.json
rm -rf models/tiny-wide
"$py" models/export.py "$src/tiny-wide" models/tiny-wide
rm -rf models/references
"$py" models/reference.py "$src/tiny" models/references
"$py" models/reference.py "$src/tiny-wide" models/references --only en_landscape \
    --model models/tiny-wide --prefix wide_
