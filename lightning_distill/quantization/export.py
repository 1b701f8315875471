"""Export of fake-quantised networks: integer codes and scales, ternary codes packed 4 per byte, reload.

:func:`export_quantized` turns each fake-quantised layer into its integer codes, scales and zero
points (everything else of the network stays float state); :func:`save_quantized` writes that
dictionary with the ternary codes packed four per byte (:func:`pack_ternary`), and
:func:`load_quantized` rebuilds a plain float network whose outputs equal the fake-quantised
network's bit for bit. The files hold tensors, numbers and strings only
(``torch.load(..., weights_only=True)`` reads them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from lightning_distill.quantization.grid import check_ch_axis, from_rows, quantize_rows
from lightning_distill.quantization.modules import (
    ActivationFakeQuantize,
    QuantizedModel,
    _unquantize,
    activation_quantizer_bits,
    quantized_layers,
    weight_quantizer,
)

__all__ = ["FORMAT", "export_quantized", "load_quantized", "pack_ternary", "save_quantized", "unpack_ternary"]

#: ``format`` entry of :func:`export_quantized` dictionaries.
FORMAT = "lightning_distill.quantized/1"

_TERNARY_LAYOUT = (
    "2-bit fields code+1 in {0,1,2}, 4 per byte, element 4i+k in bits 2k..2k+1 (LSB first), padded with code 0"
)


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes (values in {-1, 0, 1}, any shape) 4 per byte into a flat ``uint8`` tensor.

    Layout: the codes are flattened in row-major order; element ``4i + k`` is stored as ``code + 1``
    (0, 1 or 2) in bits ``2k .. 2k+1`` of byte ``i`` (least significant first); the last byte is
    padded with code 0. ``n`` codes take ``ceil(n / 4)`` bytes (a quarter of ``int8`` codes).

    Example::

        >>> import torch
        >>> packed = pack_ternary(torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8))
        >>> packed  # 0 | 1<<2 | 2<<4 | 2<<6, then 0 | 1<<2 | 1<<4 | 1<<6 (padding)
        tensor([164,  84], dtype=torch.uint8)
        >>> unpack_ternary(packed, 5)
        tensor([-1,  0,  1,  1, -1], dtype=torch.int8)
    """
    flat = codes.detach().reshape(-1).to(torch.int16)
    if flat.numel() and not bool(((flat >= -1) & (flat <= 1)).all()):
        raise ValueError("`codes` must hold ternary values in {-1, 0, 1} only (the codes of a ternary layer).")
    fields = (flat + 1).to(torch.uint8)
    pad = (-fields.numel()) % 4
    fields = torch.cat([fields, torch.ones(pad, dtype=torch.uint8, device=fields.device)]).reshape(-1, 4)
    return fields[:, 0] | (fields[:, 1] << 2) | (fields[:, 2] << 4) | (fields[:, 3] << 6)


def unpack_ternary(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: the first ``numel`` codes as a flat ``int8`` tensor."""
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(
            f"`packed` must be a 1-d uint8 tensor from pack_ternary, got {packed.dtype} of shape {tuple(packed.shape)}."
        )
    if not 0 <= numel <= 4 * packed.numel():
        raise ValueError(
            f"`numel`={numel!r} does not fit {packed.numel()} packed bytes (at most {4 * packed.numel()} codes)."
        )
    fields = torch.stack([(packed >> (2 * k)) & 3 for k in range(4)], dim=1).reshape(-1)[:numel]
    if bool((fields == 3).any()):
        raise ValueError("`packed` holds the invalid 2-bit field 3: not a pack_ternary payload.")
    return fields.to(torch.int8) - 1


def _original_key(name: str) -> str:
    return f"{name}.parametrizations.weight.original" if name else "parametrizations.weight.original"


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def export_quantized(model: nn.Module, compact: bool = False) -> dict[str, Any]:
    """Integer codes and scales of every fake-quantised layer, plus the float state of the rest.

    Returns a dict of tensors, strings, numbers and lists only (``torch.load(..., weights_only=True)``
    reads it back)::

        {"format": "lightning_distill.quantized/1",
         "layers": {name: {"codes": int8 (symmetric, ternary) or uint8 (asymmetric, 0..2^b-1), weight shape,
                           "packed": uint8, ternary only (see pack_ternary), "layout": str (ternary only),
                           "scale": float32, [C] per channel or [] per tensor,
                           "zero_point": int32 like scale (asymmetric only),
                           "shape": list[int], "dtype": str, "options": dict, "activation_bits": int | None}},
         "state_dict": the model's float state without the quantised weights (biases, BatchNorm, float layers)}

    ``weight = (codes - zero_point) * scale`` (scale broadcast along dim 0) reproduces the
    fake-quantised weight exactly (scales keep 16 significant bits). ``compact=True`` leaves out
    the ``int8`` codes of ternary layers, keeping only the packed bytes (what :func:`save_quantized` writes).

    Args:
        model: a network prepared by :func:`~lightning_distill.quantization.modules.quantize_model` or a
            :class:`~lightning_distill.quantization.modules.QuantizedModel`.
        compact: drop the redundant ``int8`` codes of ternary layers.
    """
    root = model.model if isinstance(model, QuantizedModel) else model
    layers = quantized_layers(root)
    if not layers:
        raise ValueError(
            f"{type(root).__name__} has no fake-quantised layer to export: build it with quantize_model() "
            "or QuantizedModel() (a QuantAwareDistillation student is one)."
        )
    skip_keys = {_original_key(name) for name in layers}
    state = {k: v.detach().cpu().clone() for k, v in root.state_dict().items() if k not in skip_keys}
    exported: dict[str, Any] = {}
    for name, layer in layers.items():
        quantizer = weight_quantizer(layer)
        o = quantizer.quant_options
        latent = layer.parametrizations.weight.original.detach()
        axis = check_ch_axis(quantizer.ch_axis, latent.ndim)
        codes_rows, grid, _ = quantize_rows(latent, o, axis)
        codes = from_rows(codes_rows, latent, axis).cpu()
        asymmetric = not o.ternary and not o.symmetric
        scale = grid.scale.reshape(-1) if o.per_channel else grid.scale.reshape(())
        entry: dict[str, Any] = {
            "codes": codes.to(torch.uint8 if asymmetric else torch.int8),
            "scale": scale.cpu().to(torch.float32),
            "shape": list(latent.shape),
            "dtype": str(latent.dtype).replace("torch.", ""),
            "options": quantizer.options(),
            "activation_bits": activation_quantizer_bits(layer),
        }
        if asymmetric:
            zp = grid.zero_point.reshape(-1) if o.per_channel else grid.zero_point.reshape(())
            entry["zero_point"] = zp.cpu().to(torch.int32)
        if o.ternary:
            entry["packed"] = pack_ternary(entry["codes"])
            entry["layout"] = _TERNARY_LAYOUT
            if compact:
                del entry["codes"]
        exported[name] = entry
    return {"format": FORMAT, "layers": exported, "state_dict": state}


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write :func:`export_quantized` (``compact=True``: ternary layers as packed bytes) to ``path``."""
    path = Path(path)
    torch.save(export_quantized(model, compact=True), path)
    return path


def _dequantize(entry: dict[str, Any], name: str) -> Tensor:
    shape = [int(s) for s in entry["shape"]]
    numel = math.prod(shape)
    if "codes" in entry:
        codes = entry["codes"]
    elif "packed" in entry:
        codes = unpack_ternary(entry["packed"], numel)
    else:
        raise ValueError(f"layer {name!r} of the quantised export has neither 'codes' nor 'packed' entries.")
    codes = codes.reshape(shape).to(torch.float64)
    view = [1] * len(shape)  # per-channel parameters broadcast along the channel axis
    if len(shape) >= 2:
        view[int(entry["options"].get("ch_axis", 0))] = -1

    def broadcast(t: Tensor) -> Tensor:
        return t.to(torch.float64).reshape(view if t.numel() > 1 else [])

    if entry.get("zero_point") is not None:
        codes = codes - broadcast(entry["zero_point"])
    return codes * broadcast(entry["scale"])


def load_quantized(path_or_dict: Union[str, os.PathLike, dict], model: nn.Module) -> nn.Module:
    """Rebuild a plain float network from :func:`export_quantized` / :func:`save_quantized` output.

    ``model`` is the architecture (a fresh instance such as ``DigitsMLP()``; a fake-quantised one or
    a :class:`QuantizedModel` is unwrapped in place first). Its quantised layers get the dequantised
    codes as ordinary float weights, everything else the exported float state (strict: every key
    must fit). Layers exported with ``activation_bits`` get their input fake-quantiser back (a
    parameter-free forward pre-hook) so the outputs stay equal to the fake-quantised network's.
    Files are read with ``torch.load(..., weights_only=True)``.

    Returns:
        the plain network (``model`` itself, or the network inside a :class:`QuantizedModel`).

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsMLP
        >>> from lightning_distill.quantization import quantize_model
        >>> student = quantize_model(DigitsMLP(), ternary=True)
        >>> plain = load_quantized(export_quantized(student), DigitsMLP())
        >>> x = torch.rand(4, 1, 8, 8)
        >>> torch.equal(plain(x), student(x))
        True
    """
    from lightning_distill.checkpoint import read_checkpoint

    if isinstance(path_or_dict, dict):
        export = path_or_dict
    elif isinstance(path_or_dict, (str, os.PathLike)):
        export = read_checkpoint(path_or_dict, argument="path_or_dict")
    else:
        raise TypeError(
            f"`path_or_dict` must be a path or the dict of export_quantized(), got {type(path_or_dict).__name__}."
        )
    if export.get("format") != FORMAT or not isinstance(export.get("layers"), dict):
        raise ValueError(
            f"`path_or_dict` is not a lightning_distill quantised export (format {export.get('format')!r}, expected "
            f"{FORMAT!r}): write it with save_quantized() or export_quantized()."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (the architecture to fill), got {type(model).__name__}.")
    root = _unquantize(model.model if isinstance(model, QuantizedModel) else model)
    state = dict(export.get("state_dict", {}))
    for name, entry in export["layers"].items():
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the quantised export has layer {name!r}, which {type(root).__name__} does not have: pass the "
                "architecture the export was made from."
            ) from None
        if tuple(layer.weight.shape) != tuple(entry["shape"]):
            raise ValueError(
                f"layer {name!r}: the export's weight has shape {tuple(entry['shape'])}, {type(root).__name__}'s has "
                f"{tuple(layer.weight.shape)}; build the model with the same sizes."
            )
        state[_weight_key(name)] = _dequantize(entry, name).to(layer.weight.dtype)
    try:
        root.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the quantised export does not fit {type(root).__name__}: {err}") from None
    for name, entry in export["layers"].items():
        if entry.get("activation_bits") is not None:
            root.get_submodule(name).register_forward_pre_hook(ActivationFakeQuantize(entry["activation_bits"]))
    return root
