"""Batches in one shape, and how a batch becomes a model call.

Every module of the package reads a dataloader batch through :func:`unpack_batch`, which accepts
what people's data actually yields:

* a tensor ``x``;
* a tuple / list ``(x,)``, ``(x, y)``, ``(x, y, index)`` or ``(x, y, index, mask)``;
* a dict such as ``{"image": x, "label": y}`` or Hugging Face style
  ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``.

How a :class:`Batch` reaches a model is one replaceable piece, an *input routing*:

* ``"positional"`` -- ``model(batch.input)``;
* ``"keywords"`` / :class:`KeywordInputs` -- ``model(**inputs)`` with the batch's named inputs that the
  model's ``forward`` accepts (a BERT teacher gets ``token_type_ids``, a student that does not take
  them does not); :class:`KeywordInputs` can also list or rename the keys;
* ``"auto"`` (default) -- keywords when the batch is a dict whose input names the model's ``forward``
  accepts by name, the positional tensor otherwise;
* any callable ``(model, batch) -> output``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_distill.batch import call_model, unpack_batch
    >>> b = unpack_batch({"x": torch.ones(2, 3), "label": torch.tensor([0, 1])})
    >>> b.target.tolist(), sorted(b.inputs)
    ([0, 1], ['x'])
    >>> class KeywordModel(nn.Module):
    ...     def forward(self, x, scale=1.0):
    ...         return x * scale
    >>> call_model(KeywordModel(), b).shape      # "auto": the model takes `x` by name
    torch.Size([2, 3])
    >>> call_model(nn.Linear(3, 4), b).shape     # nn.Linear.forward(input): the positional tensor
    torch.Size([2, 4])
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "InputRouting",
    "KeywordInputs",
    "LABEL_SHIFTS",
    "batch_size_of",
    "call_model",
    "clip_batch",
    "labels_repeat_inputs",
    "next_token_targets",
    "require_index",
    "resolve_routing",
    "unpack_batch",
    "with_pseudo_labels",
]


class Batch(NamedTuple):
    """A batch in the one shape every strategy reads.

    Attributes:
        input: the model input (a tensor, or for dict batches the first of ``input``, ``inputs``,
            ``x``, ``input_ids``, ``image``, ``images``).
        target: labels, or ``None``; entries equal to ``ignore_index`` mark unlabelled samples / tokens.
        index: each sample's position in its dataset (per-sample state such as a teacher cache or a
            CRD memory bank is keyed on it), or ``None``.
        mask: ``[N, L]``, True where a token is valid (token-level data), or ``None``.
        inputs: for dict batches, every entry that is not a target or an index, by name (what
            keyword routing passes to a model); ``None`` for tuple / tensor batches.
        mixed: ``[N]`` booleans, True for samples that a batch transform (function matching) mixed
            with another sample, or ``None``.
    """

    input: Any
    target: Optional[Tensor] = None
    index: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    inputs: Optional[dict[str, Any]] = None
    mixed: Optional[Tensor] = None


_INPUT_KEYS = ("input", "inputs", "x", "input_ids", "image", "images")
_TARGET_KEYS = ("target", "targets", "y", "label", "labels")
_MASK_KEYS = ("mask", "attention_mask")


def unpack_batch(batch: Any) -> Batch:
    """Normalise a dataloader batch into a :class:`Batch` (see the module docstring)."""
    if isinstance(batch, Batch):
        return batch
    if type(batch) is tuple or type(batch) is list:  # the common case first (a Mapping check costs an ABC lookup)
        if 1 <= len(batch) <= 4:
            return Batch(*batch)
        raise ValueError(f"a tuple batch must be (input[, target[, index[, mask]]]), got {len(batch)} elements.")
    if isinstance(batch, Mapping):

        def first(keys: tuple[str, ...]) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        inp = first(_INPUT_KEYS)
        if inp is None:
            raise ValueError(f"a dict batch needs one of the keys {_INPUT_KEYS}, got keys {sorted(batch)}.")
        named = {k: v for k, v in batch.items() if k not in _TARGET_KEYS and k != "index"}
        return Batch(inp, first(_TARGET_KEYS), batch.get("index"), first(_MASK_KEYS), named)
    if isinstance(batch, (tuple, list)):
        if 1 <= len(batch) <= 4:
            return Batch(*batch)
        raise ValueError(f"a tuple batch must be (input[, target[, index[, mask]]]), got {len(batch)} elements.")
    if isinstance(batch, Tensor):
        return Batch(batch)
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}.")


def batch_size_of(batch: Batch) -> int:
    """Number of samples of ``batch`` (the first dimension of its input)."""
    inp = batch.input
    return int(inp.shape[0]) if isinstance(inp, Tensor) else len(inp)


def clip_batch(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of every tensor of ``batch`` (what a shape probe needs)."""

    def clip(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim > 0:
            return value[:n]
        if isinstance(value, dict):
            return {k: clip(v) for k, v in value.items()}
        return value

    return Batch(*(clip(v) for v in batch))


#: values of ``label_shift`` (see :func:`next_token_targets`)
LABEL_SHIFTS = ("auto", "none", "next_token")


def next_token_targets(batch: Batch, ignore_index: int = -100) -> Batch:
    """Targets of a causal language model in Hugging Face's convention, made position-aligned.

    Hugging Face causal-LM batches carry ``labels`` equal to ``input_ids``; the model's logits at position
    ``t`` predict token ``t + 1`` (its own loss shifts internally). Every loss and metric here compares
    the logits at ``t`` with ``target[t]``, so the shift is applied once, to the targets:

    .. math:: \text{target}'_t = \text{labels}_{t+1}\\ (t < L - 1), \\qquad \text{target}'_{L-1} = \text{ignore}

    and ``target'_t`` is also ``ignore_index`` where token ``t + 1`` is padding (``mask`` False). Logits,
    features and ``mask`` are unchanged, so distillation terms still cover every real position (the
    teacher's next-token distribution there is defined whether or not a label follows).

    Example::

        >>> import torch
        >>> b = Batch(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[5, 6, 7, 0]]),
        ...           mask=torch.tensor([[True, True, True, False]]))
        >>> next_token_targets(b).target.tolist()
        [[6, 7, -100, -100]]
    """
    target = batch.target
    if target is None:
        return batch
    if target.ndim < 2:
        raise ValueError(
            f"label_shift='next_token' needs token targets [N, L], got a target of shape {tuple(target.shape)}. "
            "Sequence classification and other per-sample labels take label_shift='none'."
        )
    shifted = torch.full_like(target, ignore_index)
    shifted[:, :-1] = target[:, 1:]
    if batch.mask is not None:
        shifted[:, :-1].masked_fill_(~batch.mask[:, 1:].bool(), ignore_index)
    return batch._replace(target=shifted)


def labels_repeat_inputs(batch: Batch, ignore_index: int = -100) -> Optional[bool]:
    """Whether the batch follows the causal-LM convention ``labels == input_ids`` (what
    ``label_shift="auto"`` looks for): ``True`` when every labelled token equals the input token at its
    position, ``False`` when one differs (targets already aligned, masked-LM labels, class labels),
    ``None`` when the batch cannot tell (no token targets, or none labelled)."""
    target, inp = batch.target, batch.input
    if not isinstance(target, Tensor):
        return None
    if target.ndim < 2 or not isinstance(inp, Tensor) or target.shape != inp.shape:
        return False  # per-sample labels, or targets that cannot be the inputs repeated
    labelled = target != ignore_index
    if batch.mask is not None:
        labelled = labelled & batch.mask.bool()
    if not bool(labelled.any()):
        return None
    return bool((target[labelled] == inp[labelled]).all())


def require_index(batch: Batch, needs: str) -> Tensor:
    """``batch.index``, or a ``ValueError`` that starts with ``needs`` and says how to add one."""
    if batch.index is None:
        raise ValueError(
            f"{needs}, but the training batches carry none: use a dataset returning (input, target, index) -- the "
            "package's data modules do, or wrap yours in lightning_distill.data.IndexedDataset."
        )
    return torch.as_tensor(batch.index)


def with_pseudo_labels(batch: Batch, probs: Tensor, threshold: float, ignore_index: int = -100) -> Batch:
    """``batch`` with unlabelled samples / tokens given the teacher's top-1 class where its probability is at
    least ``threshold`` (pseudo-labelling; ``probs`` are the teacher's class probabilities).

    Labelled entries keep their label; masked tokens (``batch.mask`` False) and samples a batch transform
    mixed (``batch.mixed``) stay label-free. Token-level probabilities ``[N, L, V]`` need the batch's
    ``mask``: without it padding cannot be told from unlabelled tokens.
    """
    if probs.ndim == 3 and batch.mask is None:
        raise ValueError(
            "`pseudo_labels` with token-level logits [N, L, V] needs the batch's `mask`: without it padding "
            "(target ignore_index) cannot be told from unlabelled tokens. Use a data module that yields a mask "
            "(lightning_distill.data.TextDataModule does) or remove pseudo_labels."
        )
    with torch.no_grad():
        confidence, guess = probs.max(-1)
        guess = torch.where(confidence >= threshold, guess, torch.full_like(guess, ignore_index))
        target = guess if batch.target is None else torch.where(batch.target == ignore_index, guess, batch.target)
        if batch.mask is not None and target.ndim == batch.mask.ndim:
            target = torch.where(batch.mask.bool(), target, torch.full_like(target, ignore_index))
        mixed = batch.mixed
        if mixed is not None and mixed.shape == target.shape[:1]:  # mixed samples stay label-free
            keep = mixed.to(target.device).reshape(-1, *([1] * (target.ndim - 1)))
            target = torch.where(keep, torch.full_like(target, ignore_index), target)
    return batch._replace(target=target)


# ------------------------------------------------------------------------------------ routing
#: ``model -> (names its forward accepts by keyword, whether it takes **kwargs)``, read once per model
_SIGNATURES: "weakref.WeakKeyDictionary[Any, tuple[frozenset[str], bool]]" = weakref.WeakKeyDictionary()


def _forward_parameters(model: Any) -> tuple[frozenset[str], bool]:
    """Names ``model.forward`` accepts by keyword, and whether it takes ``**kwargs`` (remembered per model)."""
    try:
        return _SIGNATURES[model]
    except (KeyError, TypeError):  # not seen yet, or not weak-referenceable (a plain function)
        pass
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters.values()
    except (TypeError, ValueError):  # builtins / compiled callables without a signature
        found: tuple[frozenset[str], bool] = (frozenset(), True)
    else:
        named = frozenset(
            p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        found = (named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))
    try:
        _SIGNATURES[model] = found
    except TypeError:
        pass
    return found


class InputRouting:
    """How a :class:`Batch` becomes a model call: ``routing(model, batch) -> model output``.

    The base class is the ``"auto"`` rule of the module docstring; :class:`KeywordInputs` and the
    ``"positional"`` / ``"keywords"`` modes are its variants. The accepted names of each model's
    ``forward`` are read once and remembered (weakly: a model that is garbage-collected is forgotten).
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "positional", "keywords"):
            raise ValueError(
                f"input routing must be one of ('auto', 'positional', 'keywords'), a KeywordInputs or a callable "
                f"(model, batch) -> output, got {mode!r}."
            )
        self.mode = mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"

    def keyword_inputs(self, model: nn.Module, batch: Batch) -> Optional[dict[str, Any]]:
        """The keyword arguments for ``model``, or ``None`` for a positional call."""
        if self.mode == "positional":
            return None
        if batch.inputs is None:
            if self.mode == "keywords":
                raise ValueError(
                    "keyword input routing needs named inputs, but this batch is a tuple / tensor: use a dataset "
                    "that yields dicts, or the 'positional' (or 'auto') routing."
                )
            return None
        named, var_kw = _forward_parameters(model)
        kwargs = {k: v for k, v in batch.inputs.items() if k in named}
        if self.mode == "keywords":
            if not kwargs and not var_kw:
                raise ValueError(
                    f"keyword input routing: {type(model).__name__}.forward accepts none of the batch's inputs "
                    f"{sorted(batch.inputs)} by name (it takes {sorted(named)}). Rename the batch keys, use a "
                    "KeywordInputs(rename={...}), or route the positional input ('positional')."
                )
            return kwargs if not var_kw else dict(batch.inputs)
        return kwargs or None

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        kwargs = self.keyword_inputs(model, batch)
        return model(batch.input) if kwargs is None else model(**kwargs)


class KeywordInputs(InputRouting):
    """Keyword routing with explicit keys: ``model(**{rename.get(k, k): batch.inputs[k] for k in keys})``.

    Args:
        keys: the batch entries to pass (default: all of them that the model accepts).
        rename: ``{batch key: forward argument name}`` for models whose argument names differ from
            the batch's (``{"image": "pixel_values"}``).

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch, KeywordInputs
        >>> route = KeywordInputs(keys=["pixels"], rename={"pixels": "x"})
        >>> route(lambda x: x + 1, Batch(None, inputs={"pixels": torch.zeros(1)})).tolist()
        [1.0]
    """

    def __init__(self, keys: Optional[Sequence[str]] = None, rename: Optional[Mapping[str, str]] = None) -> None:
        super().__init__("keywords")
        if isinstance(keys, str):
            keys = [keys]
        self.keys = None if keys is None else list(keys)
        self.rename = dict(rename or {})

    def __repr__(self) -> str:
        return f"KeywordInputs(keys={self.keys!r}, rename={self.rename!r})"

    def keyword_inputs(self, model: Any, batch: Batch) -> Optional[dict[str, Any]]:
        if batch.inputs is None:
            raise ValueError(
                "KeywordInputs routes named batch entries, but this batch is a tuple / tensor: use a dataset that "
                "yields dicts, or the positional routing."
            )
        if self.keys is None:  # every entry the model accepts (under its renamed name)
            named, var_kw = _forward_parameters(model)
            return {
                self.rename.get(k, k): v for k, v in batch.inputs.items() if var_kw or self.rename.get(k, k) in named
            }
        missing = [k for k in self.keys if k not in batch.inputs]
        if missing:
            raise ValueError(f"KeywordInputs: the batch has no entries {missing}; it has {sorted(batch.inputs)}.")
        return {self.rename.get(k, k): batch.inputs[k] for k in self.keys}

    def __call__(self, model: Any, batch: Batch) -> Any:
        return model(**self.keyword_inputs(model, batch))


RoutingLike = Union[str, InputRouting, Callable[[nn.Module, Batch], Any]]


def resolve_routing(routing: Optional[RoutingLike], argument: str = "inputs") -> Callable[[nn.Module, Batch], Any]:
    """An :class:`InputRouting` from ``"auto"`` / ``"positional"`` / ``"keywords"``, an instance or a callable."""
    if routing is None:
        return InputRouting("auto")
    if isinstance(routing, str):
        try:
            return InputRouting(routing)
        except ValueError as err:
            raise ValueError(f"`{argument}`: {err}") from None
    if callable(routing):
        return routing
    raise TypeError(
        f"`{argument}` must be 'auto', 'positional', 'keywords', a KeywordInputs or a callable (model, batch) -> "
        f"output, got {type(routing).__name__}."
    )


_DEFAULT_ROUTING = InputRouting("auto")


def call_model(model: nn.Module, batch: Batch, routing: Optional[Callable[[nn.Module, Batch], Any]] = None) -> Any:
    """``model``'s raw output for ``batch`` through ``routing`` (default ``"auto"``)."""
    return (routing or _DEFAULT_ROUTING)(model, batch)
