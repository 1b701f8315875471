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

__all__ = ["require"]

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
