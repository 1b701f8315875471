"""The quantisation options as one validated value: :class:`QuantOptions`.

Every function of :mod:`lightning_distill.quantization` that quantises something takes the same
option group -- code width, symmetric or asymmetric grid, per-tensor or per-channel scales,
ternary codes, error diffusion and (for whole models) the width of the layers' input codes. It
is checked once, when a :class:`QuantOptions` is built, and travels as that object from then on.

The public functions keep accepting the options as keywords (``fake_quantize(w, bits=4)``); they
build the :class:`QuantOptions` with :meth:`QuantOptions.resolve`. Passing a ready object
(``fake_quantize(w, QuantOptions(bits=4))``) skips the second validation.

Example::

    >>> opts = QuantOptions(bits=4, per_channel=True)
    >>> opts
    QuantOptions(bits=4, symmetric=True, per_channel=True, ternary=False, error_diffusion=0.0, activation_bits=None)
    >>> QuantOptions(error_diffusion=1).error_diffusion  # normalised to float
    1.0
    >>> QuantOptions(bits=16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `bits` must be an integer in [2, 8], got 16. Use 8 or 4 for k-bit codes ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from lightning_distill.validation import check_bool, check_float, check_int

__all__ = ["MAX_BITS", "MIN_BITS", "QuantOptions", "check_bits", "check_quant_options"]

#: Valid code widths (``bits``, ``activation_bits``).
MIN_BITS, MAX_BITS = 2, 8

_BITS_HINTS = {
    "bits": " Use 8 or 4 for k-bit codes (the width of the integer codes), or ternary=True for 1.58-bit "
    "{-1, 0, +1} weights.",
    "activation_bits": " Use 8 or 4 (the width of the layers' input codes), or None to keep the inputs in float.",
}


def check_bits(name: str, value: Any) -> int:
    """A code width in ``[MIN_BITS, MAX_BITS]`` (``bool`` refused); ``ValueError`` otherwise."""
    return check_int(name, value, MIN_BITS, MAX_BITS, hint=_BITS_HINTS.get(name, ""))


def _check_diffusion(value: Any) -> float:
    try:
        return check_float("error_diffusion", value, 0, 1)
    except ValueError:  # same rule, with the meaning of the number in the message
        raise ValueError(
            f"`error_diffusion` must be a number in [0, 1] (the share of each element's quantisation error "
            f"carried to the next element of its row; 0 turns diffusion off, 1 is full Floyd-Steinberg), "
            f"got {value!r}."
        ) from None


@dataclass(frozen=True)
class QuantOptions:
    """How to quantise: one validated, immutable option group.

    Attributes:
        bits: code width in [2, 8]; validated but ignored when ``ternary=True`` (ternary wins).
        symmetric: absmax scale and signed codes ``-(2^(b-1)-1)..2^(b-1)-1``; ``False``: min/max
            range with an integer zero point and codes ``0..2^b-1``.
        per_channel: one scale per row (output channel) instead of one per tensor.
        ternary: BitNet b1.58 absmean codes in {-1, 0, +1} with the TWN least-squares scale.
        error_diffusion: share ``s`` in [0, 1] of each element's quantisation error carried to the
            next element of its row (0: off).
        activation_bits: code width in [2, 8] for the inputs of quantised layers, or ``None``
            (float inputs). Used by :func:`~lightning_distill.quantization.quantize_model` only;
            the tensor functions (``fake_quantize``, ...) ignore it.

    Validation (in this order) raises ``ValueError`` for ``bits`` / ``activation_bits`` outside
    [2, 8] or not integers and ``error_diffusion`` outside [0, 1] or not a number, ``TypeError``
    for flags that are not ``True`` / ``False``. ``bits`` is stored as ``int``,
    ``error_diffusion`` as ``float``.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    ternary: bool = False
    error_diffusion: float = 0.0
    activation_bits: Optional[int] = None

    def __post_init__(self) -> None:
        normalised = {
            "bits": check_bits("bits", self.bits),
            "symmetric": check_bool("symmetric", self.symmetric),
            "per_channel": check_bool("per_channel", self.per_channel),
            "ternary": check_bool("ternary", self.ternary),
            "error_diffusion": _check_diffusion(self.error_diffusion),
        }
        if self.activation_bits is not None:
            normalised["activation_bits"] = check_bits("activation_bits", self.activation_bits)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @classmethod
    def resolve(cls, options: Optional[QuantOptions] = None, **keywords: Any) -> QuantOptions:
        """``options`` itself, or ``QuantOptions(**keywords)`` when it is ``None`` (not both).

        What the public functions call on their ``options`` argument and option keywords.

        Example::

            >>> QuantOptions.resolve(bits=4) == QuantOptions.resolve(QuantOptions(bits=4))
            True
        """
        if options is None:
            return cls(**keywords)
        if not isinstance(options, cls):
            raise TypeError(
                f"`options` must be a {cls.__name__} or None, got {options!r}; pass the options as keywords "
                "(bits=4, ternary=True, ...) or as a QuantOptions."
            )
        if keywords:
            raise TypeError(f"pass either `options` or the option keywords {sorted(keywords)}, not both.")
        return options

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (field order), e.g. to pass on as keywords or to store."""
        return dataclasses.asdict(self)


def check_quant_options(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate quantisation options; returns them normalised (``bits`` int, ``error_diffusion`` float).

    Takes the arguments of :class:`QuantOptions` (``bits, symmetric, per_channel, ternary,
    error_diffusion, activation_bits``, positionally or by name) and returns
    ``QuantOptions(...).as_dict()``. ``bits`` is validated even when ``ternary=True``, where it is
    ignored (ternary wins).
    """
    return QuantOptions(*args, **kwargs).as_dict()
