"""``QuantAwareDistillation``: a fake-quantised (k-bit or ternary) student distilled from a float teacher."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.quantization import (
    QuantOptions,
    _unquantize,
    export_quantized,
    quantization_error,
    quantize_model,
    quantized_layers,
    save_quantized,
)
from lightning_distill.strategies.kd import KnowledgeDistillation

__all__ = ["QuantAwareDistillation"]


class QuantAwareDistillation(KnowledgeDistillation):
    r"""Quantisation-aware distillation: Hinton KD into a student whose weights are fake-quantised.

    The student's ``nn.Linear`` / ``nn.Conv`` weights are replaced in ``__init__`` by their fake-quantised
    values (:func:`~lightning_distill.quantization.quantize_model`: k-bit symmetric or asymmetric, per tensor
    or per channel, or ternary {-1, 0, +1} as in BitNet b1.58, Ma et al. 2024, arXiv:2402.17764, with the TWN
    least-squares scale of Li et al. 2016, arXiv:1605.04711; optional Floyd-Steinberg error diffusion along
    each weight row). The optimizer holds the float *latent* weights :math:`W`
    (``student.<layer>.parametrizations.weight.original``, also what checkpoints store); gradients reach them
    through the straight-through estimator (Bengio et al. 2013, arXiv:1308.3432; quantisation-aware training
    as in Jacob et al. 2018, arXiv:1712.05877). The full-precision teacher is frozen as in every strategy:

    .. math::

        \mathcal{L} = (1 - \alpha)\,\mathrm{CE}\big(f_{Q(W)}(x), y\big)
                      + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_T/T)\,\|\,
                        \mathrm{softmax}(f_{Q(W)}(x)/T)\big),
        \qquad \frac{\partial \mathcal{L}}{\partial W} := \frac{\partial \mathcal{L}}{\partial Q(W)}

    with :math:`Q` the fake quantiser. ``alpha`` weighs the distillation term. A ternary-student recipe
    often written :math:`\alpha_{ce}\,\mathrm{CE} + (1-\alpha_{ce})\,\tau^2\,\mathrm{KL}` with
    ``alpha_ce = 0.5, tau = 5`` is ``alpha=0.5, temperature=5.0`` here
    (``configs/digits/quant_ternary_kd.yaml``); its no-KD baseline is
    ``Classifier(QuantizedModel(student, ternary=True))`` (``configs/digits/quant_ternary_baseline.yaml``).

    The student *is* the fake-quantised network, so ``val/acc``, ``val/agreement``, ... and predictions are
    those of the quantised model. ``train/quant_error`` logs, with the other training terms, the mean over
    quantised layers of the mean squared difference between latent and quantised weights (kept from the
    step's own forward: no extra quantisation). :meth:`export_quantized` writes the integer codes and
    scales, and :func:`~lightning_distill.quantization.load_quantized` rebuilds a plain float network.

    Args:
        student: the float network to quantise and train (not one already fake-quantised); quantised
            **in place**, undone if the construction fails.
        teacher: the frozen full-precision teacher.
        bits, ternary, symmetric, per_channel, error_diffusion, activation_bits: the quantisation options
            (:class:`~lightning_distill.quantization.QuantOptions`; ``bits`` is validated but ignored when
            ``ternary=True``).
        skip: names of Linear / Conv layers of the student to keep in float (e.g. ``["head"]``).
        **kwargs: the KD term (``temperature``, ``alpha``, ``kl``, ...) and ``teacher_checkpoint``,
            ``optimizer``, ... of :class:`~lightning_distill.strategies.kd.KnowledgeDistillation`.

    Module objects with parametrizations cannot be pickled: use the ``ddp`` strategy (not ``ddp_spawn``);
    checkpoints (state dicts) are unaffected.

    Example::

        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> from lightning_distill.strategies.quant_aware import QuantAwareDistillation
        >>> module = QuantAwareDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...                                 ternary=True, temperature=5.0, alpha=0.5)
        >>> module.student.head.weight.unique().numel() <= 3  # the forward sees {-a, 0, a}
        True
        >>> export = module.export_quantized("student_ternary.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        bits: int = 8,
        ternary: bool = False,
        symmetric: bool = True,
        per_channel: bool = False,
        error_diffusion: float = 0.0,
        activation_bits: Optional[int] = None,
        skip: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        options = QuantOptions(
            bits=bits, symmetric=symmetric, per_channel=per_channel, ternary=ternary, error_diffusion=error_diffusion,
            activation_bits=activation_bits,
        )
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        if teacher is None:
            raise ValueError("QuantAwareDistillation needs a `teacher` module.")
        # quantised before the base class sees it (the optimizer and checkpoints hold the latent weights);
        # undone if any later argument check fails, so a failed construction leaves the student as it was
        quantize_model(student, options, skip=skip)
        try:
            super().__init__(student, teacher, **kwargs)
        except BaseException:
            _unquantize(student)
            raise
        self.quant_options = options
        self.bits, self.ternary, self.symmetric = options.bits, options.ternary, options.symmetric
        self.per_channel, self.error_diffusion = options.per_channel, options.error_diffusion
        self.activation_bits = options.activation_bits
        self.skip = tuple(skip) if not isinstance(skip, str) else (skip,)

    def quantization_error(self) -> Tensor:
        """Mean over quantised layers of ``mean((W - Q(W))^2)`` (detached).

        Uses the errors kept by each layer's last forward (the current training step's); a layer that has
        not run yet is quantised here.
        """
        errors = []
        for layer in quantized_layers(self.student).values():
            quantizer = layer.parametrizations.weight[0]
            error = quantizer.last_error
            if error is None:
                error = quantization_error(
                    layer.parametrizations.weight.original, quantizer.quant_options, ch_axis=quantizer.ch_axis
                ).float()
            errors.append(error)
        return torch.stack([e.to(self.device) for e in errors]).mean()

    def distillation_losses(self, student: Any, teacher: Any, batch: Batch) -> dict[str, Tensor]:
        """The KD terms plus ``quant_error`` (logged as ``train/quant_error``; not part of ``loss``)."""
        terms = super().distillation_losses(student, teacher, batch)
        terms["quant_error"] = self.quantization_error().to(terms["loss"].device)
        return terms

    def export_quantized(self, path: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
        """Integer codes, scales and float remainder of the student
        (:func:`lightning_distill.quantization.export_quantized`); also written to ``path`` when given
        (ternary codes packed 4 per byte). Reload with ``load_quantized(path, StudentArchitecture())``."""
        if path is not None:
            save_quantized(self.student, path)
        return export_quantized(self.student)
