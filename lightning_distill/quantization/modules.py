"""Fake quantisation of whole networks: weight parametrizations, input pre-hooks, model rewriting.

:func:`quantize_model` registers a :class:`WeightFakeQuantize` parametrization
(``torch.nn.utils.parametrize``) on the ``weight`` of every ``nn.Linear`` / ``nn.Conv1d/2d/3d``
layer, so that the optimizer updates float *latent* weights while every forward sees their
fake-quantised values, with straight-through gradients (quantisation-aware training, Jacob et al.
2018, arXiv:1712.05877). With ``activation_bits`` each quantised layer's input is fake-quantised
too (:class:`ActivationFakeQuantize`, a forward pre-hook). :class:`QuantizedModel` wraps a network
this way so that it can stand as a model in YAML; :func:`quantized_layers` lists the quantised
layers and :func:`_unquantize` undoes the rewrite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_distill.quantization.grid import check_ch_axis, ste_fake_quantize
from lightning_distill.quantization.options import QuantOptions, check_bits

__all__ = [
    "QUANTIZABLE_LAYERS",
    "ActivationFakeQuantize",
    "QuantizedModel",
    "WeightFakeQuantize",
    "quantize_model",
    "quantized_layers",
]

#: Layer types whose ``weight`` :func:`quantize_model` fake-quantises (output channels on dim 0).
QUANTIZABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class WeightFakeQuantize(nn.Module):
    """Parametrization (``torch.nn.utils.parametrize``) that fake-quantises a weight with the STE.

    Registered on a layer's ``weight`` by :func:`quantize_model`: the layer's float *latent* weight
    lives in ``layer.parametrizations.weight.original`` (what the optimizer updates and the
    checkpoint stores); reading ``layer.weight`` returns
    :func:`~lightning_distill.quantization.grid.ste_fake_quantize` of it. The mean squared
    quantisation error of the last forward is kept in :attr:`last_error` (detached).

    Args:
        options: a :class:`~lightning_distill.quantization.options.QuantOptions` (its
            ``activation_bits`` is dropped: inputs are :class:`ActivationFakeQuantize`'s job), or
            ``None`` to build one from ``keywords``.
        ch_axis: the output-channel dimension of the weight.
        **keywords: the fields of ``QuantOptions`` when ``options`` is ``None``.

    Attributes:
        quant_options: the validated options (``activation_bits=None``).
        ch_axis: as given.
        last_error: ``mean((W - Q(W))^2)`` of the last forward, or ``None`` before the first.
    """

    def __init__(self, options: Optional[QuantOptions] = None, *, ch_axis: int = 0, **keywords: Any) -> None:
        super().__init__()
        options = QuantOptions.resolve(options, **keywords)
        self.quant_options = dataclasses.replace(options, activation_bits=None)
        check_ch_axis(ch_axis, 1)  # the type; the value is checked against the weight in the forward
        self.ch_axis = int(ch_axis)
        self.last_error: Optional[Tensor] = None

    def options(self) -> dict[str, Any]:
        """The weight options as keywords of :func:`~lightning_distill.quantization.grid.fake_quantize`.

        ``{"bits", "symmetric", "per_channel", "ternary", "error_diffusion", "ch_axis"}`` (also the
        ``"options"`` entry of :func:`~lightning_distill.quantization.export.export_quantized`).
        """
        weight = self.quant_options.as_dict()
        del weight["activation_bits"]
        return {**weight, "ch_axis": self.ch_axis}

    def forward(self, w: Tensor) -> Tensor:
        q = ste_fake_quantize(w, self.quant_options, ch_axis=self.ch_axis)
        with torch.no_grad():
            self.last_error = (w.detach().float() - q.detach().float()).pow(2).mean()
        return q

    def extra_repr(self) -> str:
        o = self.quant_options
        head = "ternary" if o.ternary else f"bits={o.bits}, {'symmetric' if o.symmetric else 'asymmetric'}"
        return f"{head}, per_channel={o.per_channel}, error_diffusion={o.error_diffusion}"


class ActivationFakeQuantize:
    """Forward pre-hook fake-quantising a layer's input: per tensor, dynamic, asymmetric, with the STE.

    The range ``[min(x, 0), max(x, 0)]`` is the current batch's (so a sample's output depends a
    little on the rest of its batch, as in dynamic per-tensor quantisation engines); post-ReLU inputs
    use all ``2^bits`` codes. Registered by :func:`quantize_model` when ``activation_bits`` is set.
    """

    def __init__(self, bits: int) -> None:
        self.bits = check_bits("activation_bits", bits)
        self._options = QuantOptions(bits=self.bits, symmetric=False)

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            return None
        return (ste_fake_quantize(args[0], self._options),) + tuple(args[1:])

    def __repr__(self) -> str:
        return f"ActivationFakeQuantize(bits={self.bits})"


def weight_quantizer(module: nn.Module) -> Optional[WeightFakeQuantize]:
    """The :class:`WeightFakeQuantize` on ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuantize)]
    return found[0] if found else None


def activation_quantizer_bits(module: nn.Module) -> Optional[int]:
    """The code width of ``module``'s :class:`ActivationFakeQuantize` pre-hook, or ``None``."""
    return next((h.bits for h in module._forward_pre_hooks.values() if isinstance(h, ActivationFakeQuantize)), None)


def _activation_hooks(module: nn.Module) -> list[int]:
    return [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, ActivationFakeQuantize)]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` whose weight is fake-quantised, by module name (``""`` for the root)."""
    root = model.model if isinstance(model, QuantizedModel) else model
    return {name: m for name, m in root.named_modules() if weight_quantizer(m) is not None}


def _normalise_skip(skip: Any) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    if not isinstance(skip, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"`skip` must be a sequence of module names (str), got {skip!r}.")
    return tuple(skip)


def quantize_model(
    model: nn.Module, options: Optional[QuantOptions] = None, *, skip: Sequence[str] = (), **keywords: Any
) -> nn.Module:
    """Fake-quantise the weights of ``model``'s ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers, **in place**.

    Each such layer's ``weight`` gets a :class:`WeightFakeQuantize` parametrization
    (``torch.nn.utils.parametrize.register_parametrization``): the float latent weight becomes
    ``layer.parametrizations.weight.original`` -- the parameter the optimizer updates and the
    checkpoint stores -- and every forward uses its fake-quantised value, with the straight-through
    estimator in the backward. Biases, BatchNorm / LayerNorm parameters, embeddings and every other
    layer stay float. With ``activation_bits``, each quantised layer's *input* is fake-quantised
    too (:class:`ActivationFakeQuantize`, a forward pre-hook: per tensor, dynamic, STE).

    Module objects with parametrizations cannot be pickled (``torch.save(model)``, ``ddp_spawn``):
    save state dicts (what Lightning checkpoints do) or use
    :func:`~lightning_distill.quantization.export.save_quantized`.

    Args:
        model: the network; modified in place and returned.
        options: a :class:`~lightning_distill.quantization.options.QuantOptions`, or ``None`` to
            build one from ``keywords``.
        skip: names (as in ``model.named_modules()``) of layers to keep in float -- commonly the
            first and / or last layer, e.g. ``("block1.1", "head")``.
        **keywords: the fields of ``QuantOptions`` when ``options`` is ``None``: ``bits``,
            ``symmetric``, ``per_channel``, ``ternary``, ``error_diffusion`` (see
            :func:`~lightning_distill.quantization.grid.fake_quantize`; ``ternary=True`` wins over
            ``bits``) and ``activation_bits`` (code width in [2, 8] for the layers' inputs, or
            ``None``: float inputs).

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsMLP
        >>> model = quantize_model(DigitsMLP(), ternary=True, skip=["head"])
        >>> sorted(quantized_layers(model))
        ['block1.1']
        >>> model.block1[1].weight.unique().numel() <= 3
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    options = QuantOptions.resolve(options, **keywords)
    skip = _normalise_skip(skip)
    if quantized_layers(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) is already fake-quantised (layers {sorted(quantized_layers(model))}); "
            "pass the plain float model (or load_quantized() to get one back)."
        )
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_LAYERS)}
    unknown = [name for name in skip if name not in candidates]
    if unknown:
        raise ValueError(
            f"`skip` names layers that are not quantisable layers of {type(model).__name__}: {unknown!r}. "
            f"Valid names: {sorted(candidates)!r}."
        )
    targets = {name: m for name, m in candidates.items() if name not in skip}
    if not targets:
        raise ValueError(
            f"nothing to quantise in {type(model).__name__}: it has no nn.Linear / nn.Conv1d/2d/3d layer outside "
            f"`skip`={list(skip)!r}. Quantisable layers: {sorted(candidates)!r}."
        )
    for name, layer in targets.items():
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"layer {name!r} already has a parametrization on its weight (weight_norm, spectral_norm, ...); "
                "fake quantisation does not stack on other parametrizations: remove them or add the layer to `skip`."
            )
    for layer in targets.values():
        parametrize.register_parametrization(layer, "weight", WeightFakeQuantize(options, ch_axis=0))
        if options.activation_bits is not None:
            layer.register_forward_pre_hook(ActivationFakeQuantize(options.activation_bits))
    return model


def _unquantize(model: nn.Module) -> nn.Module:
    """Remove fake quantisation in place (weights back to the latent floats, activation hooks gone)."""
    for layer in quantized_layers(model).values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    for layer in model.modules():
        for key in _activation_hooks(layer):
            del layer._forward_pre_hooks[key]
    return model


class QuantizedModel(nn.Module):
    """A network whose ``nn.Linear`` / ``nn.Conv`` weights are fake-quantised: usable as a model in YAML.

    ``Classifier(model=QuantizedModel(DigitsMLP(), ternary=True))`` is the "ternary student without
    KD" baseline of :class:`~lightning_distill.strategies.quant_aware.QuantAwareDistillation`. The
    wrapped network is quantised in place by :func:`quantize_model` (same options, same defaults:
    every Linear / Conv weight, biases and BatchNorm stay float, ``skip`` keeps named layers float)
    and stored as ``self.model``; the forward is the wrapped network's. The options are explicit
    keywords here (not an ``options`` object) so that a YAML config sets them one by one.

    Args:
        model: the float network to quantise (in place).
        bits, ternary, symmetric, per_channel, error_diffusion, activation_bits: the fields of
            :class:`~lightning_distill.quantization.options.QuantOptions`.
        skip: names of Linear / Conv layers to keep in float.

    Example::

        >>> import torch
        >>> from lightning_distill import Classifier
        >>> from lightning_distill.models import DigitsMLP
        >>> net = QuantizedModel(DigitsMLP(), ternary=True)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> module = Classifier(net)
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        ternary: bool = False,
        symmetric: bool = True,
        per_channel: bool = False,
        error_diffusion: float = 0.0,
        activation_bits: Optional[int] = None,
        skip: Sequence[str] = (),
    ) -> None:
        super().__init__()
        options = QuantOptions(
            bits=bits, symmetric=symmetric, per_channel=per_channel, ternary=ternary,
            error_diffusion=error_diffusion, activation_bits=activation_bits,
        )
        self.model = quantize_model(model, options, skip=skip)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def export(self, compact: bool = False) -> dict[str, Any]:
        """:func:`~lightning_distill.quantization.export.export_quantized` of the wrapped network."""
        from lightning_distill.quantization.export import export_quantized  # export builds on this module

        return export_quantized(self, compact=compact)
