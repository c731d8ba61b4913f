"""Bias tuning on the torch backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.layer_problem import cosine_lr
from nncf_calibtip.algorithms.bias_tuning.backend import BiasTuningBackend, BiasTuningReport
from nncf_calibtip.algorithms.bias_tuning.config import BiasTuningConfig
from nncf_calibtip.algorithms.bias_tuning.put_back import HeldOutChange, held_out_change, keep_tuned
from nncf_calibtip.calibration.data import call_model, count_samples, to_device
from nncf_calibtip.calibration.fp_reference import fp_reference, remember_fp_state
from nncf_calibtip.quantized_layers import QuantizedLayer, find_quantized_layers

#: Samples per forward pass when computing FP outputs and held-out losses.
_EVAL_CHUNK = 256


def per_sample_loss(
    kind: str, temperature: float = 1.0, scale: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance of each sample's quantized output ``q`` to its FP output ``t`` (batched);
    ``scale`` divides the MSE."""
    if kind == "kl":

        def kl(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_q = F.log_softmax(q / temperature, dim=-1)
            log_p = F.log_softmax(t / temperature, dim=-1)
            per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * temperature**2
            return per_row.flatten(1).sum(1) if per_row.dim() > 1 else per_row

        return kl
    if kind == "mse":
        return lambda q, t: (q - t).pow(2).flatten(1).mean(1) / scale
    if kind == "cosine":
        return lambda q, t: 1 - F.cosine_similarity(q.flatten(1), t.flatten(1), dim=1)
    msg = f"Unknown loss {kind!r}."
    raise ValueError(msg)


class _Samples:
    """The calibration inputs, by sample when they are plain tensors of one shape (so that
    mini-batches can be drawn at random), else by dataset item (each item one mini-batch)."""

    def __init__(self, items: Sequence[Any], device: torch.device) -> None:
        tensors = all(isinstance(i, torch.Tensor) and i.dim() > 0 for i in items)
        if tensors and len({tuple(i.shape[1:]) for i in items}) == 1:
            self.pool: torch.Tensor | None = torch.cat(list(items)).to(device)
            self.items: list[Any] = []
            self.count = len(self.pool)
        else:
            self.pool = None
            self.items = list(items)
            self.count = len(self.items)
        self.device = device
        # Item mode: the row of the stacked outputs where each item starts (sample mode: row = index).
        self.starts = [0]
        for item in self.items:
            self.starts.append(self.starts[-1] + count_samples([item]))

    def batch(self, index: torch.Tensor) -> Any:
        if self.pool is not None:
            return self.pool[index.to(self.device)]
        return to_device(self.items[int(index[0])], self.device)

    def chunks(self, start: int, stop: int) -> Iterator[Any]:
        """Consecutive batches covering units ``start`` .. ``stop`` (samples or items)."""
        step = _EVAL_CHUNK if self.pool is not None else 1
        for i in range(start, stop, step):
            yield self.batch(torch.arange(i, min(i + step, stop)))


def _output(model: nn.Module, item: Any) -> torch.Tensor:
    out = call_model(model, item)
    if not isinstance(out, torch.Tensor):
        msg = (
            f"Bias tuning compares model outputs and needs a model that returns one tensor, got "
            f"{type(out).__name__}; wrap the model so that forward returns the tensor to match."
        )
        raise TypeError(msg)
    return out


@contextmanager
def _only_trainable(model: nn.Module, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gradients for ``tensors`` only, for the duration of the block."""
    states = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in states:
        p.requires_grad_(False)
    for t in tensors:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for p, s in states:
            p.requires_grad_(s)


class PTBiasTuningBackend(BiasTuningBackend):
    """Torch implementation of bias tuning."""

    def find_layers(self, model: Any, graph: compat.NNCFGraph) -> list[QuantizedLayer]:
        return find_quantized_layers(compat.unwrap(model), graph)

    @staticmethod
    def trainable_tensors(
        model: nn.Module, layers: Sequence[QuantizedLayer], config: BiasTuningConfig
    ) -> list[nn.Parameter]:
        """Each layer's bias, or the shift of the BatchNorm after a layer without one; plus the
        last layers' input ranges when asked."""
        params = dict(model.named_parameters())
        out: dict[int, nn.Parameter] = {}
        for layer in layers:
            name = layer.bias_name or layer.batch_norm_params.get(2)
            if name is not None and name in params:
                out[id(params[name])] = params[name]
            if config.train_last_input_range and layer.is_last and layer.input_quantizer is not None:
                # The range tensors only: NNCF quantizers also hold integer parameters (bit widths).
                for p in layer.input_quantizer.parameters():
                    if p.is_floating_point():
                        out[id(p)] = p
        return list(out.values())

    def tune(
        self,
        model: Any,
        layers: Sequence[QuantizedLayer],
        items: Sequence[Any],
        config: BiasTuningConfig,
        device: torch.device,
    ) -> BiasTuningReport:
        torch_model = compat.unwrap(model)
        original = next(torch_model.parameters()).device
        torch_model.to(device).eval()
        remember_fp_state(torch_model)
        try:
            return self._tune(torch_model, layers, items, config, device)
        finally:
            torch_model.to(original)

    def _tune(
        self,
        model: nn.Module,
        layers: Sequence[QuantizedLayer],
        items: Sequence[Any],
        config: BiasTuningConfig,
        device: torch.device,
    ) -> BiasTuningReport:
        samples = _Samples(items, device)
        n = samples.count
        n_hold = int(round(n * config.holdout_fraction))
        n_train = n - n_hold
        fp = fp_reference(model).to(device)
        with torch.no_grad():
            targets = torch.cat([_output(fp, b) for b in samples.chunks(0, n)])
        del fp
        # The MSE is relative to the FP output's mean square: the learning rate then means the
        # same for outputs of any scale (normalised embeddings have a mean square of 1/dim).
        scale = (float(targets.double().pow(2).mean()) or 1.0) if config.loss == "mse" else 1.0
        sample_loss = per_sample_loss(config.loss, config.temperature, scale)
        hold_start = n_train if n_hold else 0
        unit = samples.pool is not None

        def held_out_losses() -> torch.Tensor:
            """Per-sample losses on the held-out samples (on all when none are held out)."""
            losses = []
            with torch.no_grad():
                offset = hold_start if unit else samples.starts[hold_start]
                for b in samples.chunks(hold_start, n):
                    out = _output(model, b)
                    losses.append(sample_loss(out, targets[offset : offset + len(out)]).cpu())
                    offset += len(out)
            return torch.cat(losses)

        tensors = self.trainable_tensors(model, layers, config)
        before = held_out_losses()
        saved = [t.detach().clone() for t in tensors]
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        if config.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(tensors, lr=config.lr, momentum=config.momentum)
        else:
            opt = torch.optim.Adam(tensors, lr=config.lr)
        bs = min(config.batch_size, n_train) if unit else 1
        with _only_trainable(model, tensors):
            for step in compat.track(range(config.steps), description="Bias tuning"):
                if config.lr_schedule == "cosine":
                    for g in opt.param_groups:
                        g["lr"] = config.lr * cosine_lr(step, config.steps)
                index = torch.randint(0, n_train, (bs,), generator=gen)
                out = _output(model, samples.batch(index))
                if unit:
                    target = targets[index.to(targets.device)]
                else:
                    i = int(index[0])
                    target = targets[samples.starts[i] : samples.starts[i + 1]]
                loss = sample_loss(out, target).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if config.train_last_input_range:
            for layer in layers:
                if layer.is_last and layer.input_quantizer is not None:
                    compat.put_zero_on_grid(layer.input_quantizer)  # else OpenVINO rounds differently
        after = held_out_losses()
        if n_hold:
            change = held_out_change(before.double().numpy(), after.double().numpy())  # numpy has no bfloat16
            kept = keep_tuned(change, config.put_back)
        else:
            change, kept = HeldOutChange(0.0, 0.0, 1.0, 0), True
        if not kept:
            with torch.no_grad():
                for t, s in zip(tensors, saved, strict=True):
                    t.copy_(s)
        tuned = float(after.mean())
        return BiasTuningReport(
            loss=config.loss,
            tensors=len(tensors),
            samples=count_samples(items),
            held_out=n_hold,
            loss_before=float(before.mean()),
            loss_after=tuned if kept else float(before.mean()),
            kept=kept,
            loss_tuned=tuned,
            change_stderr=change.stderr,
            change_p_lower=change.p_lower,
            held_out_lower=change.lower,
        )
