"""Argument checks shared by every module of the package: one message style, one place.

Each check names the argument, echoes the bad value with ``!r``, says what is valid and returns the
value normalised (``int`` / ``float`` / ``bool``), so constructors read
``self.width = check_int("width", width, minimum=1)``. A ``hint`` is appended to the message (start
it with a space); it says how to fix the value.

Type errors (a string where a number belongs, ``True`` where an integer belongs) raise ``TypeError``
only where the caller asks for it (``type_error=True``); by default every bad value is a
``ValueError``, which is what LightningCLI shows next to the argument.

Example::

    >>> from lightning_distill.validation import check_choice, check_float, check_int
    >>> check_int("epochs", 3, minimum=1)
    3
    >>> check_float("alpha", 0.5, low=0.0, high=1.0)
    0.5
    >>> check_float("lr", -1.0, 0.0, low_open=True, what="> 0 or None")
    Traceback (most recent call last):
    ...
    ValueError: `lr` must be > 0 or None, got -1.0.
    >>> check_choice("mode", "sum", ("mean", "sum"))
    'sum'
    >>> check_int("epochs", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: `epochs` must be an integer >= 1, got 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Collection, Optional

__all__ = ["check_alpha", "check_bool", "check_choice", "check_float", "check_int", "check_probability", "interval"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _num(x: float) -> str:
    return f"{x:g}"


def interval(low: Optional[float], high: Optional[float], low_open: bool = False, high_open: bool = False) -> str:
    """The valid range in words: ``">= 1"``, ``"> 0"``, ``"in [0, 1)"``, ``"<= 8"``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return "any value"


def _inside(v: float, low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> bool:
    if low is not None and not (v > low if low_open else v >= low):
        return False
    if high is not None and not (v < high if high_open else v <= high):
        return False
    return True


def check_int(
    name: str,
    value: Any,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    hint: str = "",
    type_error: bool = False,
    what: Optional[str] = None,
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound may be ``None``); ``bool`` is refused.

    The message says ``must be {what}``; ``what`` defaults to ``"an integer >= minimum"`` (and the like)."""
    if what is None:
        bounded = minimum is not None or maximum is not None
        what = f"an integer {interval(minimum, maximum)}" if bounded else "an integer"
    if not _is_int(value):
        error = TypeError if type_error else ValueError
        raise error(f"`{name}` must be {what}, got {value!r}.{hint}")
    if not _inside(int(value), minimum, maximum, False, False):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.{hint}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
    type_error: bool = False,
    what: Optional[str] = None,
) -> float:
    """``value`` as a finite ``float`` inside the given interval (ints are accepted, ``bool`` is not).

    The message says ``must be {what}``; ``what`` defaults to ``"a finite number"`` and the interval
    (``"a finite number > 0"``, ``"a finite number in [0, 1]"``).
    """
    if what is None:
        bounds = interval(low, high, low_open, high_open)
        what = "a finite number" + ("" if bounds == "any value" else f" {bounds}")
    if not _is_real(value):
        error = TypeError if type_error else ValueError
        raise error(f"`{name}` must be {what}, got {value!r}.{hint}")
    v = float(value)
    if not math.isfinite(v) or not _inside(v, low, high, low_open, high_open):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.{hint}")
    return v


def check_probability(name: str, value: Any, hint: str = "") -> float:
    """A weight or share in ``[0, 1]``."""
    return check_float(name, value, 0.0, 1.0, hint=hint)


def check_alpha(value: Any, name: str = "alpha") -> float:
    """A distillation mixing weight in [0, 1] (``1 - alpha`` weighs the hard-label loss)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1] (the weight of the distillation term; 1 - {name} weighs the "
            f"hard-label loss), got {value!r}."
        )
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` only (not 0 / 1 / ``"yes"``): a ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value: Any, valid: Collection[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``valid``; the message lists every valid choice."""
    if value not in valid:
        raise ValueError(f"`{name}` must be one of {tuple(valid)}, got {value!r}.{hint}")
    return value
