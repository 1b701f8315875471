r"""Fake quantisation for quantisation-aware training and distillation.

A weight is *fake-quantised* when it is mapped to a small integer grid and straight back to floats
(quantise, then dequantise): the network computes in float but only ever sees values a k-bit or
ternary deployment can represent, and learns to be robust to that rounding
(Jacob et al. 2018, arXiv:1712.05877). Gradients pass the rounding with the straight-through
estimator (Bengio et al. 2013, arXiv:1308.3432), so the optimizer updates float *latent* weights.

The package in four parts:

* :mod:`~lightning_distill.quantization.options` -- :class:`QuantOptions`, the option group every
  function takes (``bits`` in [2, 8], ``symmetric``, ``per_channel``, ``ternary``,
  ``error_diffusion`` in [0, 1], ``activation_bits``), validated once when it is built.
* :mod:`~lightning_distill.quantization.grid` -- the mathematics: k-bit symmetric / asymmetric
  grids per tensor or per channel, ternary BitNet b1.58 codes (Ma et al. 2024, arXiv:2402.17764)
  with the TWN least-squares scale (Li et al. 2016, arXiv:1605.04711), Floyd-Steinberg style error
  diffusion, the exact idempotence guarantee; :func:`fake_quantize`, :func:`quantization_error`,
  :func:`ste_fake_quantize`.
* :mod:`~lightning_distill.quantization.modules` -- whole networks: :func:`quantize_model`
  (weight parametrizations, optional input fake-quantisation), :class:`QuantizedModel` (a model
  for YAML configs), :func:`quantized_layers`.
* :mod:`~lightning_distill.quantization.export` -- integer codes and scales out
  (:func:`export_quantized`, :func:`save_quantized`, ternary codes packed 4 per byte by
  :func:`pack_ternary`) and a plain float network back (:func:`load_quantized`).

The options are given as keywords (``fake_quantize(w, bits=4, per_channel=True)``) or as one
:class:`QuantOptions` (``fake_quantize(w, QuantOptions(bits=4, per_channel=True))``).

Example::

    >>> import torch
    >>> from lightning_distill.quantization import fake_quantize, quantization_error
    >>> w = torch.tensor([[-1.0, -0.4, 0.2, 0.6]])
    >>> fake_quantize(w, bits=2)  # grid {-1, 0, 1} * max|w|
    tensor([[-1.,  0.,  0.,  1.]])
    >>> fake_quantize(torch.tensor([0.125, -0.5, 1.0, 0.0]), ternary=True)  # alpha = mean(0.5, 1.0)
    tensor([ 0.0000, -0.7500,  0.7500,  0.0000])
    >>> opts = QuantOptions(bits=4, per_channel=True, error_diffusion=0.5)
    >>> q = fake_quantize(torch.randn(8, 16), opts)
    >>> torch.equal(fake_quantize(q, opts), q)
    True
    >>> float(quantization_error(q, bits=4, per_channel=True))
    0.0
"""

from lightning_distill.quantization.export import (
    FORMAT,
    export_quantized,
    load_quantized,
    pack_ternary,
    save_quantized,
    unpack_ternary,
)
from lightning_distill.quantization.grid import SCALE_BITS, fake_quantize, quantization_error, ste_fake_quantize
from lightning_distill.quantization.modules import (
    QUANTIZABLE_LAYERS,
    ActivationFakeQuantize,
    QuantizedModel,
    WeightFakeQuantize,
    quantize_model,
    quantized_layers,
)
from lightning_distill.quantization.modules import _unquantize as _unquantize  # used by strategies.quant_aware
from lightning_distill.quantization.options import QuantOptions, check_quant_options

__all__ = [
    "FORMAT",
    "QUANTIZABLE_LAYERS",
    "SCALE_BITS",
    "ActivationFakeQuantize",
    "QuantOptions",
    "QuantizedModel",
    "WeightFakeQuantize",
    "check_quant_options",
    "export_quantized",
    "fake_quantize",
    "load_quantized",
    "pack_ternary",
    "quantization_error",
    "quantize_model",
    "quantized_layers",
    "save_quantized",
    "ste_fake_quantize",
    "unpack_ternary",
]
