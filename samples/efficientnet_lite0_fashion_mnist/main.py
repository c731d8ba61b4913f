"""Quantize EfficientNet-Lite0 (ImageNet weights, Fashion-MNIST linear head, 64 px) with AdaQuant,
export it to OpenVINO IR and compare it with the FP32 IR on the 10,000 test images.

    python samples/efficientnet_lite0_fashion_mnist/main.py                 # W4A4, sequential
    python samples/efficientnet_lite0_fashion_mnist/main.py --activation-bits 8
"""

from pathlib import Path

from nncf_calibtip.zoo import efficientnet, sample_cli

if __name__ == "__main__":
    # The head is trained on cached backbone features of 10,000 training images on first use.
    sample_cli.run(efficientnet.task, __doc__, Path("out/efficientnet_lite0_fashion_mnist"))
