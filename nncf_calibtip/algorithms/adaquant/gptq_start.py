"""A starting point for AdaQuant's weights from error-feedback rounding (GPTQ, Frantar et al.
2023), instead of round-to-nearest.

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a layer one
at a time and moves the columns not yet rounded to cancel, on the calibration inputs, the
error the rounded ones made: it minimises ``||X (W - Q)||^2`` column by column with the
inverse of ``H = X^T X``, which is exact for a linear layer's output before its BatchNorm and
activation (both act per output channel, so each channel's weights are independent). Here
``X`` is the layer's input *after its own input quantizer*, with the range the range search
chose, and the weight rounded is not ``W`` but the least-squares fit of the FP output on those
inputs, so the start also corrects the input quantizer's error (see :func:`gptq_start`).

The result is stored as a new base weight: the value each weight had when its column was
rounded, so that round-to-nearest of the base is GPTQ's rounding and AdaQuant's bounded
changes move around it. Only conv2d (any groups) and linear layers are supported; others keep
the round-to-nearest start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.depthwise_matmul import conv2d_arguments
from nncf_calibtip.algorithms.adaquant.layer_problem import LayerProblem

#: Damping of ``H`` tried per output channel, as fractions of its mean diagonal: small
#: trusts the calibration inputs (fits them closest), large stays near the FP weight.
DAMPING_GRID = (0.01, 0.1, 1.0)
#: Share of the training samples the damping is chosen on (fitted on the rest).
VALIDATION_FRACTION = 0.25
#: Rows of ``H`` (sample positions) per input column at least, when sampling (see ``_sampling``).
_ROWS_PER_COLUMN = 512
#: Samples at least, when sampling.
_MIN_SAMPLES = 256
#: Elements of unfolded input held at once while accumulating ``H`` (bounds temporary memory).
_CHUNK_ELEMENTS = 2**24


def _columns(problem: LayerProblem, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The layer's inputs as rows of its weight's input columns, ``[samples, groups, columns,
    positions]``, and the number of groups; None for an unsupported layer."""
    if problem.layer.is_linear:  # one "sample" whose positions are all rows
        return x.reshape(-1, x.shape[-1]).t()[None, None], 1
    args = conv2d_arguments(problem.layer.node)
    if args is None or x.dim() != 4:
        return None
    kernel = tuple(int(d) for d in args["weight"].shape[-2:])
    padding, dilation, stride = args["padding"], args["dilation"], args["stride"]
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        if stride != (1, 1) or any(dilation[i] * (kernel[i] - 1) % 2 for i in range(2)):
            return None  # asymmetric padding: not one unfold
        padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(2))
    groups = int(args["groups"])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.view(x.shape[0], groups, cols.shape[1] // groups, cols.shape[2]), groups


@torch.no_grad()
def _grams(problem: LayerProblem, x: torch.Tensor, x_fp: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = Xq^T Xq`` and ``C = Xq^T X`` per group, float64 ``[groups, columns, columns]``,
    ``chunk`` samples at a time."""
    h = c = None
    for i in range(0, len(x), chunk):
        cols, groups = _columns(problem, problem.quantize_input(x[i : i + chunk]))
        cols_fp, _ = _columns(problem, x_fp[i : i + chunk])
        k = cols.shape[2]
        # [samples, groups, columns, positions] -> [groups, columns, samples x positions]
        a = cols.permute(1, 2, 0, 3).reshape(groups, k, -1)
        b = cols_fp.permute(1, 2, 0, 3).reshape(groups, k, -1)
        hi = torch.bmm(a, a.transpose(1, 2)).double()
        ci = torch.bmm(a, b.transpose(1, 2)).double()
        h, c = (hi, ci) if h is None else (h + hi, c + ci)
    return h, c


def _sampling(problem: LayerProblem, x: torch.Tensor) -> tuple[int, int] | None:
    """How many samples the Gram matrices need (enough rows per input column) and how many to
    unfold at once, or None for a layer this start does not support."""
    first = _columns(problem, x[:1])
    if first is None:
        return None
    cols, _ = first
    k, positions = cols.shape[2], cols.shape[3]
    needed = min(len(x), max(_MIN_SAMPLES, -(-_ROWS_PER_COLUMN * k // positions)))
    return needed, max(1, _CHUNK_ELEMENTS // max(cols.numel(), 1))


def _grid(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The weight grid per output channel: ``(origin, step)`` flattened to ``[out]`` and the
    integer range, as NNCF's fake quantization rounds (zero on the grid for asymmetric)."""
    wq = problem.layer.weight_quantizer
    low, scale = problem.weight_grid()
    if low is not None:
        low, range_ = compat.TuneRange.apply(low, scale.abs() + wq.eps, wq.levels)
        return low.reshape(-1), (range_ / (wq.levels - 1)).reshape(-1), 0, wq.levels - 1
    step = (scale.abs() + wq.eps) / wq.level_high
    return torch.zeros_like(step).reshape(-1), step.reshape(-1), int(wq.level_low), int(wq.level_high)


def _round(w: torch.Tensor, origin: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``w`` rounded to the grid ``origin + step * [lo .. hi]`` (broadcast)."""
    return ((w - origin) / step).round().clamp(lo, hi) * step + origin


def _gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    damping: torch.Tensor,
    grid: tuple[torch.Tensor, torch.Tensor, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares towards the FP output, then GPTQ's rounding, for several dampings at once.

    :param w: FP weight ``[groups, out, columns]``, float64.
    :param h: ``H`` per group ``[groups, columns, columns]``; ``c``: ``C`` likewise.
    :param damping: Fractions of ``H``'s mean diagonal ``[dampings]``.
    :param grid: Per output channel ``(origin, step)`` ``[groups, out]`` and the integer range.
    :return: The base weights (each weight's value when its column was rounded) and their
        roundings, ``[dampings, groups, out, columns]``.
    """
    d, (groups, out, k) = len(damping), w.shape
    # An input that is always zero has a zero row and column in H and C: with the damping
    # alone on its diagonal, the fit keeps its weight, and GPTQ rounds it to nearest.
    damp = damping[:, None] * h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[None]  # [dampings, groups]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    hd = (h[None] + damp[..., None, None] * eye).reshape(d * groups, k, k)
    lower, info = torch.linalg.cholesky_ex(hd)
    if not bool((info == 0).all()):
        raise torch.linalg.LinAlgError("H is not positive definite")
    # W* = (W C^T + damp W) (H + damp)^-1: least squares, damped towards W.
    rhs = (w @ c.transpose(-1, -2))[None] + damp[..., None, None] * w[None]
    w_ls = torch.cholesky_solve(rhs.reshape(d * groups, out, k).transpose(1, 2), lower).transpose(1, 2)
    # Columns with the largest input energy first (GPTQ's "act order").
    order = hd.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)
    hd = hd.gather(1, order[:, :, None].expand(-1, -1, k)).gather(2, order[:, None, :].expand(-1, k, -1))
    cur = w_ls.gather(2, order[:, None, :].expand(-1, out, -1)).contiguous()
    lower, info = torch.linalg.cholesky_ex(hd)
    upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if not bool((info == 0).all() and (info2 == 0).all()):
        raise torch.linalg.LinAlgError("H is not positive definite")
    origin, step, lo, hi = grid
    origin, step = origin.repeat(d, 1), step.repeat(d, 1)
    base, rounded = torch.empty_like(cur), torch.empty_like(cur)
    for i in range(k):
        col = cur[:, :, i]
        q = _round(col, origin, step, lo, hi)
        base[:, :, i], rounded[:, :, i] = col, q
        err = (col - q) / upper[:, i, i, None]
        cur[:, :, i + 1 :] -= err[:, :, None] * upper[:, None, i, i + 1 :]
    index = order[:, None, :].expand(-1, out, -1)
    back = torch.empty_like(base).scatter_(2, index, base)
    q_back = torch.empty_like(rounded).scatter_(2, index, rounded)
    return back.view(d, groups, out, k), q_back.view(d, groups, out, k)


def _output_error(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``||Xq Q^T - X W^T||^2`` per output channel, up to a constant per channel:
    ``q H q^T - 2 q C w^T``; ``q`` ``[..., groups, out, columns]`` -> ``[..., groups, out]``."""
    return ((q @ h) * q).sum(-1) - 2 * ((q @ c) * w).sum(-1)


@torch.no_grad()
def gptq_start(problem: LayerProblem, x: torch.Tensor, x_fp: torch.Tensor) -> bool:
    """Make the problem's base weight GPTQ's rounding, at the current grids, of the weight
    that best maps the quantized inputs to the FP output.

    The layer's output on quantized input ``Xq`` should match the FP layer on FP input ``X``:
    ``||Xq Q - X W||^2`` over the training inputs. With ``W* = argmin ||Xq W' - X W||^2``
    (least squares, damped towards ``W``) this is ``||Xq (Q - W*)||^2`` plus a constant, which
    GPTQ minimises. The damping decides how far the calibration inputs are trusted: where
    there are few sample positions per input column (late layers on small maps) the least
    squares fit overfits. So each output channel takes the damping of ``DAMPING_GRID`` (or
    plain round-to-nearest) that gives the lowest error on a quarter of the training samples
    when fitted on the rest; the chosen damping is then fitted on all of them.

    :param x: The layer's training inputs in the quantized model, before its input quantizer.
    :param x_fp: The same samples' inputs in the FP model.
    :return: Whether the layer was supported (else its start stays round-to-nearest).
    """
    name = problem.layer.name
    sampling = _sampling(problem, x)
    if sampling is None:
        compat.nncf_logger.debug(f"AdaQuant: {name} keeps the round-to-nearest start (not conv2d/linear)")
        return False
    n, chunk = sampling
    n_val = int(n * VALIDATION_FRACTION)
    if n_val < 1:
        return False
    h_fit, c_fit = _grams(problem, x[: n - n_val], x_fp[: n - n_val], chunk)
    h_val, c_val = _grams(problem, x[n - n_val : n], x_fp[n - n_val : n], chunk)
    groups, k = h_fit.shape[0], h_fit.shape[-1]
    w_fp = problem.base_weight
    out = w_fp.shape[0] // groups
    w = w_fp.reshape(groups, out, k).double()
    origin, step, lo, hi = _grid(problem)
    origin, step = (t.double().expand(groups * out).reshape(groups, out) for t in (origin, step))
    grid = (origin, step, lo, hi)
    damping = torch.tensor(DAMPING_GRID, dtype=torch.float64, device=w.device)
    try:
        _, q_fit = _gptq(w, h_fit, c_fit, damping, grid)
        h_all, c_all = h_fit + h_val, c_fit + c_val
        base_all, _ = _gptq(w, h_all, c_all, damping, grid)
    except torch.linalg.LinAlgError:
        compat.nncf_logger.debug(f"AdaQuant: {name} keeps the round-to-nearest start (H not invertible)")
        return False
    rtn = _round(w, origin[..., None], step[..., None], lo, hi)
    # Validation error of each candidate per output channel; the last candidate is round-to-nearest.
    errors = torch.cat([_output_error(q_fit, w, h_val, c_val), _output_error(rtn, w, h_val, c_val)[None]])
    best = errors.argmin(0)  # [groups, out]
    candidates = torch.cat([base_all, w[None]])
    chosen = candidates.gather(0, best[None, :, :, None].expand(1, -1, -1, k))[0]
    problem.base_weight.copy_(chosen.reshape(w_fp.shape).to(w_fp.dtype))
    compat.nncf_logger.debug(
        f"AdaQuant: {name} GPTQ start, output channels per damping {DAMPING_GRID} / nearest: "
        f"{torch.bincount(best.reshape(-1), minlength=len(DAMPING_GRID) + 1).tolist()}"
    )
    return True
