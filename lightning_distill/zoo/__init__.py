"""Small pretrained teachers shipped inside the package.

``teacher_checkpoint: zoo:digits_cnn`` (in YAML or Python) resolves to the state dict file
``lightning_distill/zoo/digits_cnn.pt``, wherever the package is installed; a ``NAME.safetensors`` file
(what ``lightning-distill export --format safetensors`` writes) is found the same way when there is no
``NAME.pt``.

======================  ==========================================================  ==============================
name                    architecture                                                reproduce with
======================  ==========================================================  ==============================
digits_cnn              ``lightning_distill.models.DigitsCNN()``                     ``configs/digits/teacher.yaml``
pydoc_char_transformer  ``CharTransformer(vocab_size=104, d_model=64, n_layers=2,   ``configs/text/teacher.yaml``
                        n_heads=4, max_len=256)``: 129.9k parameters, test
                        perplexity 3.321 on Python's documentation
======================  ==========================================================  ==============================

To rebuild a zoo file from a training run (strips the ``model.`` prefix of a ``Classifier``
checkpoint and saves a plain float32 state dict)::

    python -m lightning_distill.zoo export runs/digits/teacher/checkpoints/last.ckpt \\
        lightning_distill/zoo/digits_cnn.pt
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["ZOO_DIR", "available", "export", "resolve"]

ZOO_DIR = Path(__file__).resolve().parent
_SCHEME = "zoo:"


#: suffixes of zoo files, in the order ``zoo:NAME`` looks for them
SUFFIXES = (".pt", ".safetensors")


def available() -> list[str]:
    """Names of the shipped weight files (``.pt`` state dicts and ``.safetensors`` files)."""
    return sorted({p.stem for suffix in SUFFIXES for p in ZOO_DIR.glob(f"*{suffix}")})


def resolve(path: Union[str, os.PathLike]) -> Path:
    """Turn ``zoo:NAME`` into the shipped file's path (``NAME.pt``, else ``NAME.safetensors``); other paths are
    returned unchanged."""
    text = str(path)
    if not text.startswith(_SCHEME):
        return Path(path)
    name = text[len(_SCHEME) :]
    for suffix in SUFFIXES:
        candidate = ZOO_DIR / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise ValueError(f"{text!r} is not in the zoo; available: {available()}.")


def export(checkpoint: Union[str, os.PathLike], output: Union[str, os.PathLike]) -> Path:
    """Save the network weights of a training checkpoint as a plain state dict at ``output``."""
    import torch

    from lightning_distill.checkpoint import extract_state_dict, read_checkpoint

    state = extract_state_dict(read_checkpoint(checkpoint, argument="checkpoint"))
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    return output
