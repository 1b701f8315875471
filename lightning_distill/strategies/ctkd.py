"""``CTKD``: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023, arXiv:2211.16231)."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_distill.module import Batch
from lightning_distill.strategies.feature import FeatureDistillation

__all__ = ["CTKD", "GlobalTemperature", "GradientReversal", "InstanceTemperature", "cosine_ramp", "grad_reverse"]

TEMPERATURE_MODES = ("global", "instance")


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


def cosine_ramp(progress: float, length: float, maximum: float) -> float:
    r"""CTKD's curriculum for the reversal strength: 0 at the start, ``maximum`` after ``length``.

    :math:`\lambda(e) = \lambda_{max} \cdot \tfrac12 (1 - \cos(\pi \min(e, E) / E))` -- the official
    code's ``CosineDecay(max_value=0, min_value=-1, num_loops=E)`` with the sign moved into the
    reversal layer. ``length=0`` means full strength from the start.
    """
    if length <= 0:
        return float(maximum)
    e = min(max(progress, 0.0), length)
    return float(maximum) * 0.5 * (1.0 - math.cos(math.pi * e / length))


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

    Inputs are detached: the temperature module learns from the KD loss only, it does not push the
    student through its inputs. The output bias starts at ``theta_init`` and the last layer's weights
    at zero, so every sample starts at the global module's temperature.
    """

    def __init__(self, num_classes: int, theta_init: float, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, float(theta_init))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        features = torch.cat([student_logits.detach(), teacher_logits.detach()], dim=-1).float()
        return self.mlp(features).squeeze(-1)


class CTKD(FeatureDistillation):
    r"""Learnable, adversarial distillation temperature through a gradient reversal layer.

    The temperature module (parameters :math:`\theta`) plays a min-max game with the student: the
    student *descends* the KD loss, the temperature *ascends* it, because its gradient passes a
    gradient reversal layer (GRL) scaled by :math:`\lambda`:

    .. math::

        \tau = t_{start} + t_{range}\,\sigma\big(\mathrm{GRL}_\lambda(\theta)\big), \qquad
        \min_{S} \max_{\theta}\; (1-\alpha)\,\mathrm{CE} + \alpha\,\tau^2\,
            \mathrm{KL}\big(\mathrm{softmax}(z_T/\tau)\,\|\,\mathrm{softmax}(z_S/\tau)\big)
            \;[+\ \text{feature terms}]\ +\ w_a (\tau - \tau_a)^2

    * ``temperature_mode="global"``: one scalar :math:`\theta`; ``"instance"``: an MLP on the
      (detached) student and teacher logits gives one :math:`\tau` per sample.
    * :math:`\lambda` follows a cosine ramp from 0 to ``lambda_max`` over ``lambda_epochs``
      (:func:`cosine_ramp`) and then stays there -- "easy to hard": early on the temperature learns
      almost freely, later the adversary is at full strength. ``lambda_per_step=True`` evaluates
      the ramp at fractional epochs (every step) instead of once per epoch.
    * The optional anchor term :math:`w_a(\tau - \tau_a)^2` is **not** reversed (it pulls
      :math:`\tau` towards ``anchor``); seed 004's lesson: without it :math:`\tau` runs to the bound.
    * The temperature parameters form their own optimizer group (``temperature_lr``, no weight
      decay), so :math:`\lambda = 0` leaves them exactly where they are.
    * The teacher runs under ``torch.no_grad()`` (the base class), not ``inference_mode``: its logits
      enter autograd again through the learnable temperature.

    CTKD extends :class:`FeatureDistillation`: with no layer arguments it is logit KD with a
    learned temperature; with ``layer_map`` / ``teacher_layers`` it adds the same feature terms.
    Logs ``train/temperature`` (mean), ``train/lambda`` and ``train/anchor_loss`` besides the KD
    terms; :class:`~lightning_distill.callbacks.TemperatureMonitor` logs the distribution.

    Args:
        temperature_mode: ``"global"`` or ``"instance"``.
        t_start, t_range: the bounds, :math:`\tau \in (t_{start}, t_{start} + t_{range})`
            (paper: 1 and 20).
        init_temperature: the starting :math:`\tau`; ``None`` starts at :math:`\theta = 1` as the
            official code (:math:`\tau \approx 15.6` with the default bounds).
        lambda_max, lambda_epochs, lambda_per_step: the reversal schedule (paper: 1, 10).
        anchor, anchor_weight: the anchor term (off when ``anchor_weight`` is 0).
        temperature_lr: learning rate of the temperature module (own group); default: the
            optimizer's.
        instance_hidden: hidden units of the instance-mode MLP.
        **kwargs: ``alpha``, ``kl``, the feature options and everything else of
            :class:`FeatureDistillation` / :class:`KnowledgeDistillation`.

    Example::

        >>> from lightning_distill import CTKD
        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> module = CTKD(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", init_temperature=4.0)
        >>> round(module.temperature, 4)
        4.0
    """

    requires_feature_layers = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature_mode: str = "global",
        t_start: float = 1.0,
        t_range: float = 20.0,
        init_temperature: Optional[float] = None,
        lambda_max: float = 1.0,
        lambda_epochs: float = 10.0,
        lambda_per_step: bool = False,
        anchor: Optional[float] = None,
        anchor_weight: float = 0.0,
        temperature_lr: Optional[float] = None,
        instance_hidden: int = 256,
        **kwargs: Any,
    ) -> None:
        if temperature_mode not in TEMPERATURE_MODES:
            raise ValueError(f"`temperature_mode` must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}.")
        if not t_start > 0:
            raise ValueError(f"`t_start` must be > 0 (the lowest temperature), got {t_start!r}.")
        if not t_range > 0:
            raise ValueError(f"`t_range` must be > 0 (temperatures live in (t_start, t_start + t_range)), got {t_range!r}.")
        if init_temperature is not None and not t_start < init_temperature < t_start + t_range:
            raise ValueError(
                f"`init_temperature` must lie strictly inside ({t_start}, {t_start + t_range}) = (t_start, "
                f"t_start + t_range), got {init_temperature!r}."
            )
        if not lambda_max >= 0:
            raise ValueError(f"`lambda_max` must be >= 0, got {lambda_max!r}.")
        if not lambda_epochs >= 0:
            raise ValueError(f"`lambda_epochs` must be >= 0, got {lambda_epochs!r}.")
        if not anchor_weight >= 0:
            raise ValueError(f"`anchor_weight` must be >= 0, got {anchor_weight!r}.")
        if anchor_weight > 0 and (anchor is None or not anchor > 0):
            raise ValueError(f"`anchor` must be a temperature > 0 when anchor_weight > 0, got {anchor!r}.")
        if temperature_lr is not None and not temperature_lr > 0:
            raise ValueError(f"`temperature_lr` must be > 0 or None, got {temperature_lr!r}.")
        kwargs.setdefault("temperature", 4.0)  # unused by the KD term: the learned tau replaces it
        super().__init__(student, teacher, **kwargs)
        self.temperature_mode = temperature_mode
        self.t_start, self.t_range = float(t_start), float(t_range)
        if init_temperature is None:
            theta_init = 1.0
        else:
            u = (init_temperature - t_start) / t_range
            theta_init = math.log(u / (1.0 - u))
        self.theta_init = theta_init
        self.lambda_max, self.lambda_epochs, self.lambda_per_step = float(lambda_max), float(lambda_epochs), lambda_per_step
        self.anchor, self.anchor_weight = anchor, float(anchor_weight)
        self.temperature_lr = temperature_lr
        self.instance_hidden = instance_hidden
        self.temperature_module: nn.Module = GlobalTemperature(theta_init)
        self.current_lambda = 0.0
        self._last_temperature: Optional[Tensor] = None

    # ------------------------------------------------------------------ temperature
    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        num_classes = super().on_probe(example, output, teacher_output)
        if self.temperature_mode == "instance" and not isinstance(self.temperature_module, InstanceTemperature):
            self.temperature_module = InstanceTemperature(num_classes, self.theta_init, self.instance_hidden)
        return num_classes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.temperature_mode == "instance" and not isinstance(self.temperature_module, InstanceTemperature):
            weight = checkpoint["state_dict"].get("temperature_module.mlp.0.weight")
            if weight is not None:
                self.temperature_module = InstanceTemperature(weight.shape[1] // 2, self.theta_init, self.instance_hidden)

    @property
    def temperature(self) -> float:
        """The current temperature: the global :math:`\\tau` from the current :math:`\\theta`, or in instance
        mode the mean over the last batch (``used_temperature()`` has the last step's values)."""
        if isinstance(self.temperature_module, GlobalTemperature):
            return float(_bounded(self.temperature_module.theta.detach(), self.t_start, self.t_range))
        if self._last_temperature is not None:
            return float(self._last_temperature.float().mean())
        return self.t_start + self.t_range / (1.0 + math.exp(-self.theta_init))

    @temperature.setter
    def temperature(self, value: float) -> None:
        # KnowledgeDistillation.__init__ stores its fixed temperature here; CTKD learns its own
        if getattr(self, "temperature_module", None) is not None:
            raise AttributeError(
                "CTKD learns its temperature; it cannot be set. Use anchor / anchor_weight to pull it, or "
                "KnowledgeDistillation for a fixed or scheduled temperature."
            )

    def used_temperature(self) -> Optional[Tensor]:
        """The temperature(s) of the last training step, detached: a scalar or one per sample."""
        return self._last_temperature

    def lambda_at(self, epoch: float) -> float:
        return cosine_ramp(epoch, self.lambda_epochs, self.lambda_max)

    def _progress(self) -> float:
        if self._trainer is None:
            return 0.0
        epoch = float(self.current_epoch)
        if self.lambda_per_step:
            batches = self.trainer.num_training_batches
            if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
                epoch += (self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1) / batches
        return epoch

    def distillation_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        self.current_lambda = self.lambda_at(self._progress())
        theta = self.temperature_module(student_logits, teacher_logits)
        tau = _bounded(grad_reverse(theta, self.current_lambda), self.t_start, self.t_range)
        self._tau_plain = _bounded(theta, self.t_start, self.t_range)  # same value, gradient not reversed
        self._last_temperature = tau.detach()
        return tau

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        terms = super().distillation_losses(student_logits, teacher_logits, batch)
        if self.anchor_weight > 0:
            anchor = self.anchor_weight * (self._tau_plain - self.anchor).pow(2).mean()
            terms["loss"] = terms["loss"] + anchor
            terms["anchor_loss"] = anchor
        self._tau_plain = None
        terms["temperature"] = self._last_temperature.float().mean()
        terms["lambda"] = torch.tensor(self.current_lambda)
        return terms

    # ------------------------------------------------------------------ optimizer groups
    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        temp = {id(p) for p in self.temperature_module.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in temp]} for g in groups]
        group: dict[str, Union[list, float]] = {"params": list(self.temperature_module.parameters()), "weight_decay": 0.0}
        if self.temperature_lr is not None:
            group["lr"] = self.temperature_lr
        return [g for g in groups if g["params"]] + [group]
