#!/usr/bin/env bash
# Create .venv and install nncf-calibtip (editable) with the extras given as $1 (e.g. "test").
# torch and torchvision are pinned first: a plain `pip install torch` may pull another build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned torch build with its CUDA libraries takes about 5.6 GB in the venv, and pip needs
# room to unpack it besides: fail up front with the reason rather than midway with ENOSPC.
need_mb=8000
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt "$need_mb" ] && [ ! -x .venv/bin/python ]; then
  echo "error: $free_mb MB free on $(df -P . | awk 'NR==2 {print $6}'), the new .venv needs about" \
    "$need_mb MB (torch with its CUDA libraries). Free some space (old clones, venvs, pip's cache:" \
    "'pip cache purge') and rerun." >&2
  exit 1
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --no-cache-dir -e ".[${1:-test}]"
