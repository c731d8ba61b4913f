"""Quantize a ResNet-20 trained on Fashion-MNIST to 4-bit weights and activations with AdaQuant,
export it to OpenVINO IR and compare it with the FP32 IR on the 10,000 test images.

    python samples/resnet_fashion_mnist/main.py                      # W4A4, sequential AdaQuant
    python samples/resnet_fashion_mnist/main.py --activation-bits 8 --mode parallel
    python samples/resnet_fashion_mnist/main.py --config configs/adaquant_w4a4.json
"""

from pathlib import Path

from nncf_calibtip.zoo import resnet, sample_cli

if __name__ == "__main__":
    # The model is trained by nncf_calibtip.zoo.resnet on first use (~15 min on 2 cores), then cached.
    sample_cli.run(resnet.task, __doc__, Path("out/resnet_fashion_mnist"))
