#!/usr/bin/env bash
# Create .venv and install nncf-calibtip (editable) with the extras given as $1 (e.g. "test").
# torch and torchvision are pinned first: a plain `pip install torch` may pull another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[${1:-test}]"
