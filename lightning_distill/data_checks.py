"""Checks of the first batches, and of the loss: bad data is refused before it costs a run.

:class:`~lightning_distill.module.TrainingModule` runs these pure functions on the first ``check_batches``
batches (default 2) of each Trainer stage -- training, validation (the sanity check's batches count), test --
and on the example batch of the shape probe, before any forward pass of the models on it:

* :func:`check_inputs`: a batch without samples; NaN or Inf in any floating input tensor (nested in
  tuples and dicts too); a floating input whose dtype the model cannot take (``float64`` data with a
  ``float32`` model -- refused with the fix, never cast silently: a cast would be new work on every step
  for the whole run, and converting once where the data is made is cheaper and exact);
* :func:`check_targets`: labels outside ``[0, num_classes)`` other than ``ignore_index``, for per-sample
  labels ``[N]`` and token targets ``[N, L]`` (against the vocabulary size); NaN / Inf in floating targets.

Every message names the batch, the sample (and its dataset index when the batch carries one), the value,
what is valid and how to fix it. After the first batches nothing of this runs: the module's per-stage
counters reach zero, and each batch then costs one integer test.

Data beyond the checked batches can still hold a NaN; the module's loss guard (``check_finite_loss``)
stops training at the first non-finite loss, naming the step and the objective whose term went
non-finite (:func:`nonfinite_loss_message`), before the optimizer applies it (on the CPU) and before
any checkpoint of such weights is written.

Example::

    >>> import torch
    >>> from lightning_distill.batch import Batch
    >>> from lightning_distill.data_checks import check_inputs, check_targets, invalid_labels
    >>> x = torch.zeros(4, 3)
    >>> check_inputs(Batch(x), "training batch 0")        # clean: returns None
    >>> x[2, 1] = float("nan")
    >>> check_inputs(Batch(x), "training batch 0")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_distill.data_checks.BadDataError: training batch 0: the input `input` holds 1 NaN and 0 Inf value(s)...
    >>> invalid_labels(torch.tensor([0, 9, 10, -100, -1]), num_classes=10).tolist()
    [False, False, True, False, True]
    >>> check_targets(Batch(x, torch.tensor([0, 1, 10, 3])), "training batch 0", num_classes=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_distill.data_checks.BadDataError: training batch 0: label 10 of sample 2 is out of range ...
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor

from lightning_distill.batch import Batch

__all__ = [
    "BadDataError",
    "NonFiniteLossError",
    "check_inputs",
    "check_targets",
    "invalid_labels",
    "nonfinite_loss_message",
]

#: appended to every data-check message: how to switch the checks off
_SWITCH = " (Checked on the first batches of each stage; the module argument check_batches=0 turns these checks off.)"


class BadDataError(ValueError):
    """A batch that training cannot use: no samples, non-finite values, labels out of range, a wrong dtype."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf (raised by the module's ``check_finite_loss`` guard)."""


# ------------------------------------------------------------------------------------------ helpers
def _input_tensors(batch: Batch) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every tensor a model may read: the named inputs of a dict batch, else ``input``."""
    if batch.inputs is not None:
        for key, value in batch.inputs.items():
            yield from _tensors(value, f"inputs[{key!r}]")
    else:
        yield from _tensors(batch.input, "input")


def _tensors(value: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")


def _num_samples(batch: Batch) -> Optional[int]:
    for _, t in _input_tensors(batch):
        return int(t.shape[0]) if t.ndim > 0 else None
    return None


def _sample(i: int, index: Any) -> str:
    """``"sample i"`` plus its dataset index when the batch carries one."""
    text = f"sample {i}"
    if isinstance(index, Tensor) and index.ndim == 1 and i < index.shape[0]:
        text += f" (dataset index {int(index[i])})"
    return text


def _preview(items: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _nonfinite(t: Tensor, name: str, where: str, index: Any, what: str) -> None:
    """Raise :class:`BadDataError` if the floating tensor ``t`` holds NaN / Inf."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = ~finite
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(bad.sum()) - n_nan
    if t.ndim == 0:
        raise BadDataError(f"{where}: the {what} `{name}` is {t.item()}.{_SWITCH}")
    samples = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
    first = samples[0]
    position = tuple(bad[first].nonzero()[0].tolist()) if t.ndim > 1 else ()
    value = t[first][position].item() if position else t[first].item()
    at = f" at position {position}" if position else ""
    raise BadDataError(
        f"{where}: the {what} `{name}` holds {n_nan} NaN and {n_inf} Inf value(s), in {len(samples)} of its "
        f"{t.shape[0]} samples (first: {_sample(first, index)}, value {value}{at}; samples {_preview(samples)}). "
        "A non-finite value makes the loss NaN and, after one optimizer step, every weight. Fix the data where it "
        "is made (a division by zero in a normalisation, a missing value read as NaN), replace the values "
        "(torch.nan_to_num in the dataset's transform) or drop those samples." + _SWITCH
    )


# ------------------------------------------------------------------------------------------ inputs
def check_inputs(
    batch: Batch, where: str, *, model_dtype: Optional[torch.dtype] = None, model_name: str = "the model"
) -> None:
    """Refuse a batch without samples, with NaN / Inf in a floating input, or whose floating inputs the model
    cannot take (``model_dtype``: the dtype of its parameters; ``None`` skips the dtype check).

    A dtype is refused when it differs from the parameters' and either the input is ``float64`` or the model
    is ``float32`` (Lightning's ``"16-mixed"`` / ``bf16`` / ``"64-true"`` precisions convert or autocast
    inputs themselves; pass ``model_dtype=None`` under them).

    Raises:
        BadDataError: naming ``where``, the input, the sample, the value and the fix.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> check_inputs(Batch({"x": torch.ones(2, 3, dtype=torch.float64)}), "validation batch 0",
        ...              model_dtype=torch.float32)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_distill.data_checks.BadDataError: validation batch 0: the input `input['x']` is torch.float64 ...
    """
    n = _num_samples(batch)
    if n == 0:
        raise BadDataError(
            f"{where} holds no samples (its input tensors have 0 rows): the dataset or its split is empty, or a "
            "collate function / sampler dropped every sample. Check the data path and split sizes." + _SWITCH
        )
    for name, t in _input_tensors(batch):
        if t.is_floating_point() or t.is_complex():
            _nonfinite(t, name, where, batch.index, "input")
    if model_dtype is None:
        return
    for name, t in _input_tensors(batch):
        if not t.is_floating_point() or t.dtype == model_dtype:
            continue
        if t.dtype == torch.float64 or model_dtype == torch.float32:
            raise BadDataError(
                f"{where}: the input `{name}` is {t.dtype} but the parameters of {model_name} are {model_dtype}, "
                "and a layer cannot mix them. Convert the data once where it is made, e.g. "
                f"torch.as_tensor(array, dtype={model_dtype}) or x.to({model_dtype}) in the dataset (NumPy arrays "
                "are float64 by default), or train the model in the data's precision (Trainer(precision='64-true') "
                "for float64)." + _SWITCH
            )


# ------------------------------------------------------------------------------------------ targets
def invalid_labels(target: Tensor, num_classes: int, ignore_index: int = -100) -> Tensor:
    """Boolean mask of the entries of an integer ``target`` that are neither a class in ``[0, num_classes)``
    nor ``ignore_index``.

    Example::

        >>> import torch
        >>> invalid_labels(torch.tensor([[0, 5, -100], [6, -1, 2]]), num_classes=6).tolist()
        [[False, False, False], [True, True, False]]
    """
    return ~((target == ignore_index) | ((target >= 0) & (target < num_classes)))


def check_targets(
    batch: Batch, where: str, num_classes: Optional[int] = None, ignore_index: int = -100
) -> None:
    """Refuse labels the task loss and the metrics cannot use: integer labels outside ``[0, num_classes)`` other
    than ``ignore_index`` (per sample ``[N]`` or per token ``[N, L]``, then ``num_classes`` is the vocabulary
    size), and NaN / Inf in floating targets. ``num_classes=None`` checks floating targets only.

    A batch whose every label is ``ignore_index`` is valid (unlabelled data; the task loss is 0 on it and the
    metrics count labelled samples only).

    Raises:
        BadDataError: naming ``where``, the sample (and token), the value, the valid range and the fix.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> b = Batch(torch.zeros(2, 4), torch.tensor([[1, -100, 3, 2], [0, 1, 2, -7]]))
        >>> check_targets(b, "training batch 3", num_classes=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_distill.data_checks.BadDataError: training batch 3: token target -7 of sample 1, token 3 is ...
    """
    target = batch.target
    if not isinstance(target, Tensor):
        return
    if target.is_floating_point():
        _nonfinite(target, "target", where, batch.index, "target")
        return
    if num_classes is None or target.dtype == torch.bool or target.is_complex():
        return
    bad = invalid_labels(target, num_classes, ignore_index)
    if not bool(bad.any()):
        return
    first = bad.nonzero()[0].tolist()
    value = int(target[tuple(first)])
    values = sorted({int(v) for v in target[bad].unique()[:64].tolist()})
    count = int(bad.sum())
    tokens = target.ndim >= 2
    kind = "token target" if tokens else "label"
    at = _sample(first[0], batch.index) if first else "the batch"
    if tokens:
        at += f", token {first[1]}" if len(first) == 2 else f", position {tuple(first[1:])}"
    valid = (
        f"valid {'token ids' if tokens else 'labels'} are 0..{num_classes - 1} "
        f"({'the vocabulary of' if tokens else 'num_classes ='} {num_classes}) and {ignore_index} (ignore_index, "
        f"{'no target' if tokens else 'unlabelled'})"
    )
    if value < 0:
        fix = (
            f"Negative {kind}s other than ignore_index are not classes: mark unlabelled "
            f"{'tokens' if tokens else 'samples'} with {ignore_index}, or set the module's ignore_index to the value "
            f"your data uses (ignore_index={value})."
        )
    elif tokens:
        fix = (
            f"The data holds token ids the model has no logits for: build the model with a vocabulary of at least "
            f"{max(values) + 1} (vocab_size in its init_args), or use the tokenizer the model was made for."
        )
    else:
        fix = (
            f"Labels must count from 0: labels numbered 1..{num_classes} need y - 1. If the data really has "
            f"{max(values) + 1} or more classes, build the model with num_classes={max(values) + 1} (its init_args "
            "in YAML)."
        )
    raise BadDataError(
        f"{where}: {kind} {value} of {at} is out of range ({count} invalid entr{'y' if count == 1 else 'ies'}, "
        f"values {values}); {valid}. {fix}" + _SWITCH
    )


# ------------------------------------------------------------------------------------------ the loss
def nonfinite_loss_message(
    loss: float,
    step: int,
    epoch: int,
    terms: Optional[Mapping[str, Any]] = None,
    first_step: Optional[int] = None,
) -> str:
    """The message of :class:`NonFiniteLossError`: the step, the loss, each term (objective) with its value --
    the non-finite ones first -- and the usual causes.

    ``first_step``: on accelerators the loss is checked every few steps (no device sync on the others), so the
    first non-finite loss lies somewhere in ``[first_step, step]``; ``None`` when this very step was checked
    before its optimizer update.

    Example::

        >>> import torch
        >>> print(nonfinite_loss_message(float("nan"), 12, 0, {"task": torch.tensor(0.5),
        ...                                                    "kd": torch.tensor(float("nan"))}))  # doctest: +ELLIPSIS
        the training loss is nan at global step 12 (epoch 0): objective 'kd' is nan (the other terms are finite: ...
    """
    values = {}
    for name, value in (terms or {}).items():
        try:
            values[name] = float(value.detach().float().sum()) if isinstance(value, Tensor) else float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    good = {k: v for k, v in values.items() if math.isfinite(v)}
    if first_step is None or first_step >= step:
        when = f"at global step {step} (epoch {epoch})"
    else:
        when = f"at a global step from {first_step} to {step} (epoch {epoch}; the steps between two checks)"
    text = f"the training loss is {loss} {when}"
    if bad:
        names = ", ".join(f"{k!r} is {v}" for k, v in bad.items())
        text += f": objective{'s' if len(bad) > 1 else ''} {names}"
        if good:
            text += " (the other terms are finite: " + ", ".join(f"{k} = {v:.4g}" for k, v in good.items()) + ")"
    elif values:
        text += " while every term is finite (" + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()) + "): the sum "
        text += "overflowed"
    kept = (
        "Training stopped before this step's optimizer update, so the weights and every checkpoint written so far "
        "are from before it."
        if first_step is None
        else "Training stopped, and no checkpoint is written from these weights: the checkpoints written so far are "
        "from before it."
    )
    return (
        f"{text}. {kept} Usual causes: a learning rate too high for this model (lower it, or clip gradients with "
        "Trainer(gradient_clip_val=1.0)); NaN / Inf in samples beyond the first checked batches (check the data); a "
        "temperature near 0 or a division by a vanishing norm in a custom objective; float16 overflow (use "
        "precision='bf16-mixed'). Trainer(detect_anomaly=True) finds the operation that produced it. The module "
        "argument check_finite_loss=False turns this guard off."
    )
