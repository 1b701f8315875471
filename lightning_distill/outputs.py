"""``ModelOutputs``: the one type every model call is read into.

Students and teachers may return whatever their authors chose. :func:`as_outputs` reads

* a tensor -- the logits;
* a dict, a Hugging Face ``ModelOutput`` or any object with a ``logits`` attribute -- ``logits``,
  and ``hidden_states`` / ``attentions`` when present (the other entries of a dict or a dataclass are
  kept in ``extras``);
* a tuple / list -- its first element is the logits (a NamedTuple with a ``logits`` field is read by
  name), the rest is kept in ``extras["outputs"]``;

into a :class:`ModelOutputs`. Features captured from named layers by forward hooks
(:mod:`lightning_distill.features`) are added to ``features`` by the module that runs the model.
Objectives (:mod:`lightning_distill.objectives`) read only this type.

Example::

    >>> import torch
    >>> from lightning_distill.outputs import as_outputs
    >>> as_outputs(torch.zeros(2, 3)).logits.shape
    torch.Size([2, 3])
    >>> out = as_outputs({"logits": torch.zeros(2, 3), "hidden_states": (torch.zeros(2, 4),), "aux": 1})
    >>> len(out.hidden_states), out.extras
    (1, {'aux': 1})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor

__all__ = ["ModelOutputs", "as_outputs"]

_KNOWN = ("logits", "hidden_states", "attentions")


@dataclass
class ModelOutputs:
    """What one model produced for one batch.

    Attributes:
        logits: ``[N, C]`` class scores or ``[N, L, V]`` token scores (``None`` for a model that
            produces none, e.g. a feature extractor).
        features: ``{layer name: tensor}`` captured from named submodules.
        hidden_states: per-layer hidden states when the model returns them (transformers).
        attentions: per-layer attention maps when the model returns them.
        extras: anything else the model returned, by name.
    """

    logits: Optional[Tensor] = None
    features: dict[str, Tensor] = field(default_factory=dict)
    hidden_states: Optional[tuple[Tensor, ...]] = None
    attentions: Optional[tuple[Tensor, ...]] = None
    extras: dict[str, Any] = field(default_factory=dict)

    def detach(self) -> "ModelOutputs":
        """The same outputs with every tensor detached (teacher outputs never carry a graph)."""

        def d(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.detach()
            if isinstance(v, (tuple, list)):
                return type(v)(d(x) for x in v)
            if isinstance(v, dict):
                return {k: d(x) for k, x in v.items()}
            return v

        return ModelOutputs(
            d(self.logits), {k: d(v) for k, v in self.features.items()}, d(self.hidden_states), d(self.attentions),
            d(self.extras),
        )


def _from_mapping(out: Mapping[str, Any], source: str) -> ModelOutputs:
    if "logits" not in out:
        raise ValueError(
            f"{source} returned a {type(out).__name__} without a 'logits' entry (keys: {sorted(out)}); distillation "
            "reads the logits. Return them under 'logits', or wrap the model so that it returns them."
        )
    return ModelOutputs(
        out["logits"],
        hidden_states=out.get("hidden_states"),
        attentions=out.get("attentions"),
        extras={k: v for k, v in out.items() if k not in _KNOWN},
    )


def as_outputs(out: Any, source: str = "the model") -> ModelOutputs:
    """Read any model output into :class:`ModelOutputs` (see the module docstring)."""
    if isinstance(out, ModelOutputs):
        return out
    if isinstance(out, Tensor):
        return ModelOutputs(out)
    if isinstance(out, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict)
        return _from_mapping(out, source)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # NamedTuple
        if "logits" in out._fields:
            return _from_mapping(out._asdict(), source)
    if isinstance(out, (tuple, list)):
        if not out or not isinstance(out[0], Tensor):
            raise ValueError(
                f"{source} returned a {type(out).__name__} whose first element is not a tensor; distillation reads the "
                "logits from the first element of a tuple output."
            )
        return ModelOutputs(out[0], extras={"outputs": tuple(out[1:])} if len(out) > 1 else {})
    if hasattr(out, "logits"):  # dataclasses and other objects with a `logits` attribute
        extras = {}
        if dataclasses.is_dataclass(out):
            extras = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name not in _KNOWN}
        return ModelOutputs(
            out.logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            extras=extras,
        )
    raise TypeError(
        f"{source} returned a {type(out).__name__}; distillation needs a logits tensor, a tuple whose first element "
        "is the logits, a dict with 'logits', or an object with a `logits` attribute."
    )
