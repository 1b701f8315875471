r"""Distillation temperatures behind one interface: fixed, scheduled, or learned.

Every logit objective softens both distributions with a temperature :math:`T`,
:math:`p = \mathrm{softmax}(z / T)`. The temperature is an object with one interface, so that callbacks
(:class:`~lightning_distill.callbacks.TemperatureMonitor`, :class:`~lightning_distill.callbacks.ProgressiveCurriculum`)
talk to it rather than to attributes they hope exist:

* ``temperature(student_logits, teacher_logits, step)`` -> :class:`TemperatureStep` -- the value of
  this training step (a float, or a tensor with one value per sample), an optional penalty term
  that is added to the loss, and values to log;
* :attr:`Temperature.value` -- the current temperature as one float;
* :meth:`Temperature.set` -- change it (what a curriculum does);
* :attr:`Temperature.last` -- what the last training step used (detached; per sample or a scalar);
* :attr:`Temperature.reversal` -- the gradient-reversal strength of a learned temperature (``None``
  for the others).

Kinds: :class:`FixedTemperature` (Hinton et al. 2015), :class:`TemperatureSchedule` (a ramp over
training, e.g. the rising temperature of curriculum distillation), :class:`LearnedTemperature`
(CTKD, Li et al. 2023, arXiv:2211.16231: a temperature learned adversarially through a gradient
reversal layer). :func:`as_temperature` turns a float into a :class:`FixedTemperature`.

Example::

    >>> import torch
    >>> from lightning_distill.temperature import FixedTemperature, LearnedTemperature
    >>> t = FixedTemperature(4.0)
    >>> t.set(2.0); t.value
    2.0
    >>> learned = LearnedTemperature(init_temperature=4.0)
    >>> round(learned.value, 4)
    4.0
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from lightning_distill.validation import check_choice, check_float, check_int

__all__ = [
    "FixedTemperature",
    "GlobalTemperature",
    "GradientReversal",
    "InstanceTemperature",
    "LearnedTemperature",
    "Temperature",
    "TemperatureSchedule",
    "TemperatureStep",
    "as_temperature",
    "cosine_ramp",
    "grad_reverse",
]

TEMPERATURE_MODES = ("global", "instance")
SCHEDULE_SHAPES = ("linear", "cosine")


def check_temperature_value(value: Any, name: str = "temperature") -> float:
    """A fixed temperature: a finite number > 0."""
    return check_float(name, value, 0.0, low_open=True, what="a finite number > 0", hint=" It is the softmax temperature T.")


class TemperatureStep(NamedTuple):
    """What a temperature gives one training step."""

    value: Union[float, Tensor]
    penalty: Optional[Tensor] = None
    logs: Optional[dict[str, Tensor]] = None


class Temperature(nn.Module):
    """Interface of every temperature (see the module docstring)."""

    #: the gradient-reversal strength of the last step (learned temperatures only)
    reversal: Optional[float] = None

    def __init__(self) -> None:
        super().__init__()
        self.last: Optional[Union[float, Tensor]] = None

    @property
    def value(self) -> float:
        raise NotImplementedError

    def set(self, value: float) -> None:
        raise NotImplementedError

    def build(self, num_classes: int) -> None:
        """Create parts that depend on the number of classes (called by the probe)."""

    @property
    def needs_probe(self) -> bool:
        """Whether :meth:`build` still has parts to create."""
        return False

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups of a learned temperature (none for the others)."""
        return []

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, step: Any = None) -> TemperatureStep:
        raise NotImplementedError


class FixedTemperature(Temperature):
    """A constant temperature ``T > 0``; :meth:`set` changes it (a curriculum may between steps)."""

    def __init__(self, value: float = 4.0) -> None:
        super().__init__()
        self._value = check_temperature_value(value)
        self.last = self._value

    def extra_repr(self) -> str:
        return f"{self._value}"

    @property
    def value(self) -> float:
        return self._value

    def set(self, value: float) -> None:
        self._value = check_temperature_value(value)
        self.last = self._value

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, step: Any = None) -> TemperatureStep:
        return TemperatureStep(self._value)


def cosine_ramp(progress: float, length: float, maximum: float) -> float:
    r"""0 at the start, ``maximum`` after ``length``, along half a cosine.

    :math:`r(e) = r_{max} \cdot \tfrac12 (1 - \cos(\pi \min(e, E) / E))` -- CTKD's schedule of the
    reversal strength (the official code's ``CosineDecay(max_value=0, min_value=-1, num_loops=E)`` with
    the sign moved into the reversal layer). ``length=0`` means ``maximum`` from the start.
    """
    if length <= 0:
        return float(maximum)
    e = min(max(progress, 0.0), length)
    return float(maximum) * 0.5 * (1.0 - math.cos(math.pi * e / length))


class TemperatureSchedule(Temperature):
    r"""A temperature that moves from ``start`` to ``end`` over ``epochs`` epochs, then stays at ``end``.

    ``shape="linear"``: :math:`T(e) = T_0 + (T_1 - T_0) \min(e / E, 1)`; ``"cosine"``: the same with
    :func:`cosine_ramp` (slow, fast, slow). ``e`` is the fractional epoch of the step, so the value
    changes at every step.

    Example::

        >>> from lightning_distill.temperature import TemperatureSchedule
        >>> schedule = TemperatureSchedule(start=1.0, end=4.0, epochs=10)
        >>> schedule.at(5.0), schedule.at(20.0)
        (2.5, 4.0)
    """

    def __init__(self, start: float = 1.0, end: float = 4.0, epochs: float = 10.0, shape: str = "linear") -> None:
        super().__init__()
        self.start = check_temperature_value(start, "start")
        self.end = check_temperature_value(end, "end")
        self.epochs = check_float("epochs", epochs, 0.0)
        self.shape = check_choice("shape", shape, SCHEDULE_SHAPES)
        self.last = self.start

    def at(self, progress: float) -> float:
        """The temperature at fractional epoch ``progress``."""
        if self.shape == "cosine":
            share = cosine_ramp(progress, self.epochs, 1.0)
        else:
            share = 1.0 if self.epochs <= 0 else min(max(progress, 0.0) / self.epochs, 1.0)
        return self.start + (self.end - self.start) * share

    @property
    def value(self) -> float:
        return float(self.last)

    def set(self, value: float) -> None:
        raise ValueError(
            "a TemperatureSchedule follows its own schedule and cannot be set; use a FixedTemperature (a float) "
            "for a temperature that a curriculum changes."
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, step: Any = None) -> TemperatureStep:
        value = self.at(step.progress if step is not None else 0.0)
        self.last = value
        return TemperatureStep(value)


# ----------------------------------------------------------------------------------------- learned
class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-lambda`` on the way back (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambda_ * grad, None


def grad_reverse(x: Tensor, lambda_: float) -> Tensor:
    """``GradientReversal.apply(x, lambda_)``: the value of ``x``, gradient ``-lambda * dL/dx``."""
    return GradientReversal.apply(x, lambda_)


def _bounded(theta: Tensor, t_start: float, t_range: float) -> Tensor:
    return t_start + t_range * torch.sigmoid(theta)


class GlobalTemperature(nn.Module):
    r"""One learnable scalar :math:`\theta`; :math:`\tau = t_{start} + t_{range}\,\sigma(\theta)`."""

    def __init__(self, theta_init: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.theta


class InstanceTemperature(nn.Module):
    r"""A small MLP on ``[student logits, teacher logits]`` (detached) giving one :math:`\theta` per sample.

    Inputs are detached: the temperature learns from the KD loss only, it does not push the student
    through its inputs. The output bias starts at ``theta_init`` and the last layer's weights at zero,
    so every sample starts at the global temperature.
    """

    def __init__(self, num_classes: int, theta_init: float, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, float(theta_init))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        features = torch.cat([student_logits.detach(), teacher_logits.detach()], dim=-1).float()
        return self.mlp(features).squeeze(-1)


class LearnedTemperature(Temperature):
    r"""CTKD's adversarial temperature (Li et al., AAAI 2023, arXiv:2211.16231).

    The temperature parameters :math:`\theta` *ascend* the distillation loss that the student
    descends, because their gradient passes a gradient reversal layer scaled by :math:`\lambda`:

    .. math::

        \tau = t_{start} + t_{range}\,\sigma\big(\mathrm{GRL}_\lambda(\theta)\big), \qquad
        \text{penalty} = w_a\,\overline{(\tau - \tau_a)^2}

    * ``mode="global"``: one scalar :math:`\theta`; ``"instance"``: an MLP on the detached student
      and teacher logits gives one :math:`\tau` per sample (built from the number of classes).
    * :math:`\lambda` follows :func:`cosine_ramp` from 0 to ``lambda_max`` over ``lambda_epochs``
      ("easy to hard"); ``lambda_per_step=True`` evaluates the ramp at fractional epochs.
    * The optional anchor penalty is **not** reversed: it pulls :math:`\tau` towards ``anchor``
      (without it the temperature can run to its upper bound).
    * The parameters form their own optimizer group (``lr``, no weight decay), so :math:`\lambda = 0`
      leaves them where they are.

    Args:
        mode: ``"global"`` or ``"instance"``.
        t_start, t_range: the bounds, :math:`\tau \in (t_{start}, t_{start} + t_{range})` (paper: 1, 20).
        init_temperature: the starting :math:`\tau`; ``None`` starts at :math:`\theta = 1` as the
            official code (:math:`\tau \approx 15.6` with the default bounds).
        lambda_max, lambda_epochs, lambda_per_step: the reversal schedule (paper: 1, 10).
        anchor, anchor_weight: the anchor penalty (off when ``anchor_weight`` is 0).
        lr: learning rate of the temperature parameters; ``None``: the optimizer's.
        hidden: hidden units of the instance-mode MLP.
    """

    def __init__(
        self,
        mode: str = "global",
        t_start: float = 1.0,
        t_range: float = 20.0,
        init_temperature: Optional[float] = None,
        lambda_max: float = 1.0,
        lambda_epochs: float = 10.0,
        lambda_per_step: bool = False,
        anchor: Optional[float] = None,
        anchor_weight: float = 0.0,
        lr: Optional[float] = None,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.mode = check_choice("temperature_mode", mode, TEMPERATURE_MODES)
        self.t_start = check_float("t_start", t_start, 0.0, low_open=True, what="> 0", hint=" It is the lowest temperature.")
        self.t_range = check_float(
            "t_range", t_range, 0.0, low_open=True, what="> 0", hint=" Temperatures live in (t_start, t_start + t_range)."
        )
        if init_temperature is not None and not (
            isinstance(init_temperature, (int, float)) and t_start < init_temperature < t_start + t_range
        ):
            raise ValueError(
                f"`init_temperature` must lie strictly inside ({t_start}, {t_start + t_range}) = (t_start, "
                f"t_start + t_range), got {init_temperature!r}."
            )
        self.lambda_max = check_float("lambda_max", lambda_max, 0.0, what=">= 0")
        self.lambda_epochs = check_float("lambda_epochs", lambda_epochs, 0.0, what=">= 0")
        self.lambda_per_step = bool(lambda_per_step)
        self.anchor_weight = check_float("anchor_weight", anchor_weight, 0.0, what=">= 0")
        if self.anchor_weight > 0 and (anchor is None or not anchor > 0):
            raise ValueError(f"`anchor` must be a temperature > 0 when anchor_weight > 0, got {anchor!r}.")
        self.anchor = anchor
        self.lr = None if lr is None else check_float("temperature_lr", lr, 0.0, low_open=True, what="> 0 or None")
        self.hidden = check_int("instance_hidden", hidden, minimum=1)
        if init_temperature is None:
            self.theta_init = 1.0
        else:
            u = (init_temperature - t_start) / t_range
            self.theta_init = math.log(u / (1.0 - u))
        #: the parametrisation of theta: GlobalTemperature, or InstanceTemperature once built
        self.param: Optional[nn.Module] = GlobalTemperature(self.theta_init) if mode == "global" else None
        self.reversal = 0.0

    @property
    def needs_probe(self) -> bool:
        return self.param is None

    def build(self, num_classes: int) -> None:
        if self.mode == "instance" and self.param is None:
            self.param = InstanceTemperature(num_classes, self.theta_init, self.hidden)

    def parameter_groups(self) -> list[dict]:
        if self.param is None:
            return []
        group: dict[str, Any] = {"params": list(self.param.parameters()), "weight_decay": 0.0}
        if self.lr is not None:
            group["lr"] = self.lr
        return [group]

    def lambda_at(self, epoch: float) -> float:
        return cosine_ramp(epoch, self.lambda_epochs, self.lambda_max)

    @property
    def value(self) -> float:
        """The global :math:`\\tau` from the current :math:`\\theta`, or in instance mode the mean of the last step."""
        if isinstance(self.param, GlobalTemperature):
            return float(_bounded(self.param.theta.detach(), self.t_start, self.t_range))
        if isinstance(self.last, Tensor):
            return float(self.last.float().mean())
        return self.t_start + self.t_range / (1.0 + math.exp(-self.theta_init))

    def set(self, value: float) -> None:
        """Move the global :math:`\\theta` so that :math:`\\tau` = ``value`` (learning continues from there)."""
        if not isinstance(self.param, GlobalTemperature):
            raise ValueError(
                "an instance-wise learned temperature has one value per sample and cannot be set to one number; "
                "use temperature_mode='global', or give the curriculum no temperatures."
            )
        if not self.t_start < float(value) < self.t_start + self.t_range:
            raise ValueError(
                f"a learned temperature lives in ({self.t_start}, {self.t_start + self.t_range}); cannot set it to "
                f"{value!r}."
            )
        u = (float(value) - self.t_start) / self.t_range
        with torch.no_grad():
            self.param.theta.fill_(math.log(u / (1.0 - u)))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, step: Any = None) -> TemperatureStep:
        if self.param is None:
            raise RuntimeError(
                "the instance-wise learned temperature is built from the number of classes by the probe in setup(); "
                "run the module through a Trainer or call module.build(example) first."
            )
        progress = 0.0 if step is None else (step.progress if self.lambda_per_step else float(step.epoch))
        lam = self.lambda_at(progress)
        self.reversal = lam
        theta = self.param(student_logits, teacher_logits)
        tau = _bounded(grad_reverse(theta, lam), self.t_start, self.t_range)
        self.last = tau.detach()
        penalty = None
        if self.anchor_weight > 0:
            plain = _bounded(theta, self.t_start, self.t_range)  # the same value, gradient not reversed
            penalty = self.anchor_weight * (plain - self.anchor).pow(2).mean()
        logs = {"temperature": self.last.float().mean(), "lambda": torch.tensor(lam)}
        return TemperatureStep(tau, penalty, logs)


def as_temperature(value: Union[float, Temperature], name: str = "temperature") -> Temperature:
    """A :class:`Temperature` from a number (fixed) or a temperature object."""
    if isinstance(value, Temperature):
        return value
    return FixedTemperature(check_temperature_value(value, name))
