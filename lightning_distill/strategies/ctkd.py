"""``CTKD``: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023, arXiv:2211.16231)."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from lightning_distill.objectives import FeatureMatch
from lightning_distill.strategies.kd import KnowledgeDistillation
from lightning_distill.temperature import (
    GlobalTemperature,
    GradientReversal,
    InstanceTemperature,
    LearnedTemperature,
    cosine_ramp,
    grad_reverse,
)

__all__ = ["CTKD", "GlobalTemperature", "GradientReversal", "InstanceTemperature", "cosine_ramp", "grad_reverse"]


class CTKD(KnowledgeDistillation):
    r"""Learnable, adversarial distillation temperature through a gradient reversal layer.

    Hinton's objective whose temperature is a :class:`~lightning_distill.temperature.LearnedTemperature`:
    the temperature parameters :math:`\theta` play a min-max game with the student -- the student
    *descends* the KD loss, the temperature *ascends* it, because its gradient passes a gradient reversal
    layer (GRL) scaled by :math:`\lambda`:

    .. math::

        \tau = t_{start} + t_{range}\,\sigma\big(\mathrm{GRL}_\lambda(\theta)\big), \qquad
        \min_{S} \max_{\theta}\; (1-\alpha)\,\mathrm{CE} + \alpha\,\tau^2\,
            \mathrm{KL}\big(\mathrm{softmax}(z_T/\tau)\,\|\,\mathrm{softmax}(z_S/\tau)\big)
            \;[+\ \text{feature terms}]\ +\ w_a (\tau - \tau_a)^2

    * ``temperature_mode="global"``: one scalar :math:`\theta`; ``"instance"``: an MLP on the (detached)
      student and teacher logits gives one :math:`\tau` per sample.
    * :math:`\lambda` follows a cosine ramp from 0 to ``lambda_max`` over ``lambda_epochs`` and then stays
      there -- "easy to hard". ``lambda_per_step=True`` evaluates the ramp at fractional epochs.
    * The optional anchor term :math:`w_a(\tau - \tau_a)^2` is **not** reversed (it pulls :math:`\tau`
      towards ``anchor``); without it the temperature can run to its upper bound.
    * The temperature parameters form their own optimizer group (``temperature_lr``, no weight decay), so
      :math:`\lambda = 0` leaves them exactly where they are.
    * ``module.temperature`` reads the current :math:`\tau`; setting it (a curriculum does) moves the global
      :math:`\theta` there, and learning continues from that value.
    * The teacher runs under ``torch.no_grad()``, not ``inference_mode``: its logits enter autograd again
      through the learned temperature.

    ``features`` adds a :class:`~lightning_distill.objectives.FeatureMatch` term (e.g. FitNets hints) to
    the logit term. Logs ``train/temperature`` (mean), ``train/lambda`` and ``train/anchor_loss`` besides the
    KD terms; :class:`~lightning_distill.callbacks.TemperatureMonitor` logs the distribution.

    Args:
        temperature_mode: ``"global"`` or ``"instance"``.
        t_start, t_range: the bounds, :math:`\tau \in (t_{start}, t_{start} + t_{range})` (paper: 1 and 20).
        init_temperature: the starting :math:`\tau`; ``None`` starts at :math:`\theta = 1` as the official
            code (:math:`\tau \approx 15.6` with the default bounds).
        lambda_max, lambda_epochs, lambda_per_step: the reversal schedule (paper: 1, 10).
        anchor, anchor_weight: the anchor term (off when ``anchor_weight`` is 0).
        temperature_lr: learning rate of the temperature module (own group); default: the optimizer's.
        instance_hidden: hidden units of the instance-mode MLP.
        features: an optional :class:`~lightning_distill.objectives.FeatureMatch` added to the logit term, or
            a dict of its arguments (``{layer_map: {block3: block2}, loss: cosine}``; kept in the checkpoint's
            hyperparameters, so ``load_from_checkpoint`` rebuilds it).
        **kwargs: ``alpha``, ``kl``, ``teacher_checkpoint``, ``optimizer``, ... of
            :class:`~lightning_distill.strategies.kd.KnowledgeDistillation`.

    Example::

        >>> from lightning_distill import CTKD
        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> module = CTKD(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", init_temperature=4.0)
        >>> round(module.temperature, 4)
        4.0
    """

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
        features: Union[FeatureMatch, dict[str, Any], None] = None,
        **kwargs: Any,
    ) -> None:
        if "temperature" in kwargs:
            raise ValueError(
                "CTKD learns its temperature: give `init_temperature` (and t_start / t_range), not `temperature`."
            )
        learned = LearnedTemperature(
            temperature_mode, t_start, t_range, init_temperature, lambda_max, lambda_epochs, lambda_per_step,
            anchor, anchor_weight, temperature_lr, instance_hidden,
        )
        objectives = {}
        feature = FeatureMatch(**features) if isinstance(features, dict) else features
        if feature is not None:
            if not isinstance(feature, FeatureMatch):
                raise TypeError(
                    "`features` must be a lightning_distill.objectives.FeatureMatch or a dict of its arguments, got "
                    f"{type(feature).__name__}."
                )
            objectives["feature"] = feature
        super().__init__(student, teacher, temperature=learned, objectives=objectives, **kwargs)

    @property
    def learned_temperature(self) -> LearnedTemperature:
        return self.objectives["kd"].temperature

    @property
    def temperature_module(self) -> Optional[nn.Module]:
        """The parametrisation of :math:`\\theta`: a ``GlobalTemperature``, or an ``InstanceTemperature`` once built."""
        return self.learned_temperature.param

    @property
    def temperature_mode(self) -> str:
        return self.learned_temperature.mode

    @property
    def t_start(self) -> float:
        return self.learned_temperature.t_start

    @property
    def t_range(self) -> float:
        return self.learned_temperature.t_range

    @property
    def theta_init(self) -> float:
        return self.learned_temperature.theta_init

    @property
    def current_lambda(self) -> float:
        """The gradient-reversal strength of the last training step."""
        return self.learned_temperature.reversal

    def lambda_at(self, epoch: float) -> float:
        return self.learned_temperature.lambda_at(epoch)

    def used_temperature(self) -> Optional[Tensor]:
        """The temperature(s) of the last training step, detached: a scalar or one per sample."""
        last = self.learned_temperature.last
        return last if isinstance(last, Tensor) else None

    def distillation_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> Union[float, Tensor]:
        """The temperature this step would use (with the gradient reversal), e.g. ``[N]`` in instance mode."""
        return self.learned_temperature(student_logits, teacher_logits, self.step_info()).value
