#!/usr/bin/env bash
# Fetch Fashion-MNIST from Debian's archive (package dataset-fashion-mnist) into data/fashion-mnist.
# Uses only apt-get (no hub, no URL). Idempotent: does nothing when the files are there.
set -euo pipefail
root="${CALIBTIP_DATA:-data}"
dest="$root/fashion-mnist"
if [ -f "$dest/t10k-labels-idx1-ubyte.gz" ] && [ -f "$dest/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
mkdir -p "$root/debs" "$dest"
if ! ls "$root"/debs/dataset-fashion-mnist_*_all.deb >/dev/null 2>&1; then
  if ! (cd "$root/debs" && apt-get download dataset-fashion-mnist 2>/dev/null); then
    apt-get update -qq
    (cd "$root/debs" && apt-get download dataset-fashion-mnist)
  fi
fi
dpkg -x "$root"/debs/dataset-fashion-mnist_*_all.deb "$root/debs/root"
cp "$root"/debs/root/usr/share/datasets/fashion-mnist/*.gz "$dest/"
echo "Fashion-MNIST in $dest"
