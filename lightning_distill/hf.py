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

A distilled student leaves as a normal Hugging Face model directory through :func:`save_pretrained` (the
teacher stays behind); tokenized text for such models comes from
:class:`lightning_distill.data.TokenizedTextDataModule`.

Example::

    >>> from lightning_distill.hf import require
    >>> require("transformers").__name__
    'transformers'
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

from torch import nn

__all__ = ["MODEL_OUTPUTS", "PRETRAINED_TASKS", "pretrained", "request_outputs", "require", "save_pretrained"]

#: model outputs beyond the logits that objectives may read (``Objective.model_outputs``)
MODEL_OUTPUTS = ("hidden_states", "attentions")

#: optional packages -> the extra of ``pyproject.toml`` that installs them (what :func:`require` names)
_EXTRA = {
    "transformers": "hf",
    "tokenizers": "hf",
    "safetensors": "hf",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
}


def require(package: str, extra: Optional[str] = None) -> ModuleType:
    """Import an optional dependency, or raise an ``ImportError`` that names the extra installing it.

    ``extra`` names the extra in the message when a package belongs to several (``safetensors`` is in ``[hf]``
    and ``[export]``); by default it is looked up by the package's top-level name.
    """
    try:
        return importlib.import_module(package)
    except ImportError as err:
        extra = extra or _EXTRA.get(package.split(".")[0], "hf")
        raise ImportError(
            f"this feature needs the optional package `{package.split('.')[0]}`: install lightning-distill with the "
            f'`[{extra}]` extra, e.g. pip install -e ".[{extra}]" in a clone (it is part of ".[dev]").'
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


def _trained_network(module_or_model: Any) -> nn.Module:
    """The student of a distillation module, the model of a ``Classifier``, or the network itself."""
    transformers = require("transformers")
    if isinstance(module_or_model, transformers.PreTrainedModel):
        return module_or_model
    for name in ("student", "model"):  # DistillationModule.student, Classifier.model
        network = getattr(module_or_model, name, None)
        if isinstance(network, nn.Module):
            return network
    return module_or_model


def save_pretrained(module_or_model: Any, directory: Union[str, os.PathLike], tokenizer: Optional[Any] = None) -> Path:
    """Write the distilled student -- never the teacher -- as a Hugging Face model directory.

    ``module_or_model`` is a distillation module (its ``student`` is written), a ``Classifier`` (its
    ``model``) or a ``transformers`` model. The directory gets what ``model.save_pretrained`` writes
    (``config.json``, ``model.safetensors``) and, when ``tokenizer`` is given (a ``transformers`` tokenizer
    or a ``tokenizers.Tokenizer``), the tokenizer files, so that ``AutoModelFor...from_pretrained(directory)``
    and ``AutoTokenizer.from_pretrained(directory)`` load them. ``output_hidden_states`` /
    ``output_attentions``, which objectives reading those outputs switch on during training, are written
    switched off.

    Returns:
        the directory.

    Raises:
        TypeError: the student is not a ``transformers`` ``PreTrainedModel`` (save its state dict instead).
    """
    transformers = require("transformers")
    model = _trained_network(module_or_model)
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            "save_pretrained writes Hugging Face model directories and needs a transformers PreTrainedModel, but the "
            f"trained model (the student) is a {type(model).__module__}.{type(model).__name__}. Save its weights with "
            "the library's state-dict export instead: torch.save(module.student.state_dict(), 'student.pt'), or "
            "`python -m lightning_distill.zoo export RUN.ckpt student.pt` from a training checkpoint."
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a path, got {type(directory).__name__}.")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"`directory` {str(directory)!r} is a file; pass a directory (it is created if missing).")
    if tokenizer is not None:
        from lightning_distill.data.tokenized import as_pretrained_tokenizer

        tokenizer = as_pretrained_tokenizer(tokenizer)
    config = model.config
    flags = {name: getattr(config, name, False) for name in ("output_hidden_states", "output_attentions")}
    try:
        for name in flags:
            setattr(config, name, False)
        model.save_pretrained(directory)
    finally:
        for name, value in flags.items():
            setattr(config, name, value)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


#: ``task`` of :func:`pretrained` -> the ``transformers`` auto class that loads it
PRETRAINED_TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "base": "AutoModel",
}


def pretrained(path: str, task: str = "causal_lm", **kwargs: Any) -> nn.Module:
    """A ``transformers`` model from a local directory (``AutoModelFor<task>.from_pretrained(path, **kwargs)``).

    The way to a pretrained student or teacher in YAML (a ``class_path`` may name this function)::

        teacher:
          class_path: lightning_distill.hf.pretrained
          init_args:
            path: runs/hf/teacher_export       # what lightning_distill.hf.save_pretrained wrote
            task: causal_lm                    # causal_lm | masked_lm | sequence_classification | token_classification | base

    Nothing is downloaded unless ``path`` is a hub name and the machine has network access.
    """
    if task not in PRETRAINED_TASKS:
        raise ValueError(f"`task` must be one of {tuple(PRETRAINED_TASKS)}, got {task!r}.")
    auto = getattr(require("transformers"), PRETRAINED_TASKS[task])
    return auto.from_pretrained(os.fspath(path), **kwargs)
