#!/usr/bin/env bash
# Install nncf-calibtip with the sample extras into .venv, fetch Fashion-MNIST (Debian package)
# and run the main sample end to end: ResNet-20 (trained on first use, ~15 min on 2 cores,
# then cached) quantized to W4A4 with sequential AdaQuant, FP32 vs quantized IR on the test set.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[samples]"
bash scripts/fetch_data.sh
.venv/bin/python samples/resnet_fashion_mnist/main.py "$@"
