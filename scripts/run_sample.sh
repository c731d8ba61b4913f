#!/usr/bin/env bash
# Install nncf-calibtip with the sample extras into .venv, fetch Fashion-MNIST (Debian package)
# and run the main sample end to end: ResNet-20 (trained on first use, 7-15 min on 2 cores,
# then cached) quantized to W4A4 with sequential AdaQuant, FP32 vs quantized IR on the test set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh samples
bash scripts/fetch_data.sh
.venv/bin/python samples/resnet_fashion_mnist/main.py "$@"
