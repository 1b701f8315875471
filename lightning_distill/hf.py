"""Hugging Face ``transformers`` / ``tokenizers`` support: the optional ``[hf]`` extra.

Hugging Face models need nothing special to be students or teachers: every model output is read through
:func:`lightning_distill.outputs.as_outputs` (``.logits``, ``.hidden_states``, ``.attentions``), dict
batches reach each model as the keyword inputs its ``forward`` accepts
(:mod:`lightning_distill.batch`), and the causal-LM label convention (``labels == input_ids``) is
applied once by ``label_shift`` (:func:`lightning_distill.batch.next_token_targets`). Vocabularies of
different sizes from one tokenizer are compared with ``vocab_alignment="truncate"``.

What does need the libraries imports them through :func:`require`, so that the core package works
without them::

    pip install -e ".[hf]"      # transformers + tokenizers (included in ".[dev]")

Example::

    >>> from lightning_distill.hf import require
    >>> require("transformers").__name__
    'transformers'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

__all__ = ["MODEL_OUTPUTS", "request_outputs", "require"]

#: model outputs beyond the logits that objectives may read (``Objective.model_outputs``)
MODEL_OUTPUTS = ("hidden_states", "attentions")

_EXTRA = {"transformers": "hf", "tokenizers": "hf", "safetensors": "hf"}


def require(package: str) -> ModuleType:
    """Import an optional dependency, or raise an ``ImportError`` that names the extra installing it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        extra = _EXTRA.get(package.split(".")[0], "hf")
        raise ImportError(
            f"this feature needs the optional package `{package.split('.')[0]}`: install lightning-distill with the "
            f"`[{extra}]` extra, e.g. pip install -e \".[{extra}]\" in a clone (it is part of \".[dev]\")."
        ) from err


def request_outputs(model: nn.Module, outputs: "set[str] | tuple[str, ...]") -> None:
    """Ask a Hugging Face model to return ``hidden_states`` / ``attentions`` on every forward.

    Sets ``config.output_hidden_states`` / ``config.output_attentions``; attention maps need the eager
    attention implementation (the fused kernels do not materialise them), which is switched to first.
    Models without a Hugging Face ``config`` are left alone: they must return these outputs themselves
    (an objective reading them says so when they are missing).
    """
    unknown = set(outputs) - set(MODEL_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown model outputs {sorted(unknown)}; objectives can read {MODEL_OUTPUTS}.")
    config = getattr(model, "config", None)
    if config is None or not outputs:
        return
    if "attentions" in outputs:
        if getattr(config, "_attn_implementation", "eager") != "eager" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        config.output_attentions = True
    if "hidden_states" in outputs:
        config.output_hidden_states = True
