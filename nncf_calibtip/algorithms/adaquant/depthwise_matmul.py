"""Depthwise convolutions on small feature maps as one batched matrix product, for AdaQuant's
training steps.

On the CPU, PyTorch computes a depthwise conv's weight gradient with a loop over the channels;
on the small maps of a network's late stages this dominates a step: on EfficientNet-Lite0 at
64 px the depthwise layers took half of AdaQuant's optimisation time, most of it in the 4x4 and
2x2 stages. With at most ``MAX_POSITIONS`` input positions, each channel's convolution is a
small dense matrix (output positions x input positions) built from the kernel, and a batched
matrix product computes every channel at once, forward and backward. The result equals the
convolution up to float rounding (the sums run in another order); the model itself is never
changed, only how AdaQuant evaluates the layer while fitting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nncf_calibtip import compat

#: Input positions (height x width) up to which the matrix form is used: its cost grows with
#: their square, the convolution's with their number.
MAX_POSITIONS = 64

_CONV2D_FUNCS = (F.conv2d, torch.conv2d)
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_arguments(node: compat.NNCFNode) -> dict[str, Any] | None:
    """The arguments of a conv2d graph node by name, or None when the node is not a conv2d:
    ``weight`` (a tensor description with a 4-d ``shape``), ``input``, ``bias``, ``groups``,
    and ``stride``, ``dilation`` and ``padding`` as pairs (``padding`` may stay a string)."""
    attrs = node.layer_attributes
    if not isinstance(attrs, compat.PT2OpLayerAttributes) or attrs.func not in _CONV2D_FUNCS:
        return None
    args: dict[str, Any] = dict(_CONV2D_DEFAULTS)
    args.update(zip(_CONV2D_ARGS, attrs.op_args, strict=False))
    args.update(attrs.op_kwargs)
    shape = getattr(args["weight"], "shape", None)
    if shape is None or len(shape) != 4:
        return None
    for name in ("stride", "dilation", "padding"):
        if not isinstance(args[name], str):
            args[name] = _pair(args[name])
    return args


class SmallMapDepthwise:
    """A depthwise conv2d (one input channel per group) evaluated as a batched matrix product
    when its input map is small and on the CPU, and as the convolution otherwise.

    :param stride: The convolution's stride.
    :param padding: Its (numeric) padding.
    :param dilation: Its dilation.
    """

    def __init__(self, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._taps: dict[tuple, tuple[torch.Tensor, tuple[int, int]]] = {}

    @staticmethod
    def for_node(node: compat.NNCFNode) -> SmallMapDepthwise | None:
        """The matrix form of ``node`` when it is a depthwise conv2d with numeric padding, else None."""
        args = conv2d_arguments(node)
        if args is None:
            return None
        shape = tuple(int(d) for d in args["weight"].shape)
        if shape[1] != 1 or args["groups"] != shape[0] or isinstance(args["padding"], str):
            return None
        return SmallMapDepthwise(args["stride"], args["padding"], args["dilation"])

    def _taps_for(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """0/1 matrix [kernel taps, output positions x input positions] and the output size."""
        h, wd = x.shape[-2:]
        kernel = (int(w.shape[-2]), int(w.shape[-1]))
        key = (h, wd, kernel, x.device, x.dtype)
        if key not in self._taps:
            n = h * wd
            eye = torch.eye(n, dtype=x.dtype, device=x.device).view(n, 1, h, wd)
            cols = F.unfold(eye, kernel, dilation=self.dilation, padding=self.padding, stride=self.stride)
            out_h = (h + 2 * self.padding[0] - self.dilation[0] * (kernel[0] - 1) - 1) // self.stride[0] + 1
            out_w = (wd + 2 * self.padding[1] - self.dilation[1] * (kernel[1] - 1) - 1) // self.stride[1] + 1
            # cols[input position, tap, output position] -> [tap, output position x input position]
            taps = cols.permute(1, 2, 0).reshape(kernel[0] * kernel[1], -1).contiguous()
            self._taps[key] = (taps, (out_h, out_w))
        return self._taps[key]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, c, h, wd = x.shape
        if h * wd > MAX_POSITIONS or x.device.type != "cpu":  # measured on the CPU only
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, c)
        taps, (out_h, out_w) = self._taps_for(x, w)
        mats = (w.reshape(c, -1) @ taps).view(c, out_h * out_w, h * wd)
        y = torch.bmm(mats, x.reshape(b, c, h * wd).permute(1, 2, 0))  # [channel, out position, batch]
        y = y.permute(2, 0, 1).reshape(b, c, out_h, out_w)
        return y if bias is None else y + bias.view(1, c, 1, 1)
