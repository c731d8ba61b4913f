#!/usr/bin/env bash
# Install nncf-calibtip with its test extras into .venv, then lint and run the default (fast)
# test suite. Slow tests (real models) run with: .venv/bin/python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
# NNCF compiles its fake-quantize C++ extension on first use; build it once up front so no
# test pays (or times out on) the build.
NNCF_EXTENSION_LOAD_TIMEOUT=1200 .venv/bin/python -c \
  "from nncf.torch.quantization.quantize_functions import QuantizedFunctionsCPU as F; F.get('Quantize_forward')"
.venv/bin/ruff check nncf_calibtip tests samples benchmarks
.venv/bin/ruff format --check nncf_calibtip tests samples benchmarks
.venv/bin/python -m pytest -q "$@"
