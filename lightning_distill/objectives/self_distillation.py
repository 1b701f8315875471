r"""``AuxiliaryHeads``: "Be Your Own Teacher" self-distillation (Zhang et al. 2019, arXiv:1905.08094).

Every layer named in ``exit_layers`` (listed shallow to deep) gets an auxiliary classifier, built from
the shapes the probe finds: a small bottleneck for feature maps ``[N, C, H, W]`` (1x1 conv ->
``width``, 3x3 conv, both with BN + ReLU, global pooling), a linear layer + ReLU for ``[N, D]`` vectors,
then a linear classifier. The network's own output is the deepest of the
:math:`K = \text{len(exit\_layers)} + 1` heads. Each shallow head's pooled feature is also projected
(linear) to the dimension of the deepest feature :math:`F_K` -- the output of ``final_feature_layer``
(globally pooled when it is a map) or, by default, the input of the module that produces the network's
logits (found by tracing the probe forward). The objective is
:func:`~lightning_distill.losses.self_distillation_loss`:

.. math::

    \mathcal{L} = \sum_{i=1}^{K} (1 - \alpha)\,\mathrm{CE}(z_i, y)
        + \alpha\, T^2 \sum_{i=1}^{K-1} \mathrm{KL}\big(\mathrm{sg}[q_K^T] \,\|\, q_i^T\big)
        + \lambda \sum_{i=1}^{K-1} \mathrm{MSE}\big(P_i(f_i), \mathrm{sg}[F_K]\big)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.features import INPUT_SUFFIX
from lightning_distill.losses import self_distillation_loss
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.probe import Probe
from lightning_distill.temperature import FixedTemperature
from lightning_distill.validation import check_alpha, check_int

__all__ = ["AuxiliaryHeads", "HeadOutputs", "early_exit"]


def early_exit(head_logits: Sequence[Tensor], threshold: float) -> tuple[Tensor, Tensor]:
    """Per sample, the first head (shallow to deep) whose top softmax probability is ``>= threshold``.

    Samples on which no shallow head is confident enough use the deepest head, whatever its own
    confidence. Threshold 0 therefore sends every sample out at head 1, a threshold above 1 sends every
    sample to the deepest head.

    Returns:
        ``(logits [N, C] of the head each sample used, exit_index [N])`` with 1-based head numbers
        (1 = shallowest, ``K`` = deepest), the numbering of the ``head{i}`` metrics.

    Example::

        >>> import torch
        >>> shallow = torch.tensor([[4.0, 0.0], [0.0, 0.1]])  # confident, then unsure
        >>> deep = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        >>> logits, index = early_exit([shallow, deep], threshold=0.9)
        >>> index.tolist(), logits.argmax(-1).tolist()
        ([1, 2], [0, 1])
    """
    stacked = torch.stack(list(head_logits))  # [K, N, C]
    confident = stacked.float().softmax(-1).amax(-1) >= threshold  # [K, N]
    confident[-1] = True  # the deepest head takes every sample left
    first = confident.int().argmax(0)  # index of the first True (argmax returns the first maximum)
    logits = stacked.gather(0, first.view(1, -1, 1).expand(1, *stacked.shape[1:])).squeeze(0)
    return logits, first + 1


class HeadOutputs(NamedTuple):
    """Every head of one forward.

    Attributes:
        logits: ``K`` tensors ``[N, C]``, shallow to deep; the last is the network's own output.
        features: ``K - 1`` tensors ``[N, D]``: the shallow heads' features after their projection.
        final_feature: ``[N, D]``: the deepest feature.
    """

    logits: list[Tensor]
    features: list[Tensor]
    final_feature: Tensor


class ExitHead(nn.Module):
    """Auxiliary classifier on one intermediate layer (see the module docstring); ``features`` gives the
    pooled ``[N, width]`` feature that the hint projection reads."""

    def __init__(self, in_shape: tuple[int, ...], width: int, num_classes: int) -> None:
        super().__init__()
        if len(in_shape) == 4:
            c = in_shape[1]
            self.features = nn.Sequential(
                nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        else:
            self.features = nn.Sequential(nn.Linear(in_shape[-1], width), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _pool(feature: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, C]`` by global average pooling; ``[N, D]`` unchanged."""
    return feature.mean(dim=(2, 3)) if feature.ndim == 4 else feature


def _check_rank(name: str, shape: tuple[int, ...], argument: str) -> None:
    if len(shape) not in (2, 4):
        raise ValueError(
            f"`{argument}`: layer {name!r} outputs shape {shape}; SelfDistillation builds heads on "
            "[N, C, H, W] feature maps or [N, D] vectors only. Pick another layer."
        )


class AuxiliaryHeads(Objective):
    """The BYOT objective (see the module docstring); needs no teacher.

    Logs ``task_loss`` (sum of the ``K`` cross-entropies), ``kd_loss``, ``feature_loss`` (unweighted
    sums) and ``head{i}_ce``; ``loss`` is the weighted total times ``weight``.

    Args:
        exit_layers: names of the student's layers that get a head, shallow to deep.
        final_feature_layer: layer whose output is the deepest feature; ``None``: the input of the module
            producing the logits.
        temperature: ``T > 0`` of the KL term.
        alpha: weight in [0, 1] of the KL term; ``1 - alpha`` weighs each head's cross-entropy.
        feature_weight: :math:`\\lambda \\ge 0`, weight of the hint term.
        width: width of every auxiliary head (channels for maps, hidden units for vectors).
        ignore_index: label of unlabelled samples.
    """

    name = "byot"
    needs_teacher = False

    def __init__(
        self,
        exit_layers: Sequence[str],
        final_feature_layer: Optional[str] = None,
        temperature: float = 3.0,
        alpha: float = 0.3,
        feature_weight: float = 0.03,
        width: int = 64,
        ignore_index: int = -100,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.exit_layers = [str(n) for n in exit_layers]
        self.final_feature_layer = final_feature_layer
        self.temperature = FixedTemperature(temperature)
        self.alpha = check_alpha(alpha)
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or not (
            0 <= float(feature_weight) < float("inf")
        ):
            raise ValueError(
                f"`feature_weight` (lambda of the hint term) must be a finite number >= 0, got {feature_weight!r}."
            )
        self.feature_weight = float(feature_weight)
        self.width = check_int("bottleneck_channels", width, minimum=1)
        self.ignore_index = int(ignore_index)
        self.student_layer_argument = "exit_layers"
        self.heads = nn.ModuleList()  # built from the probe, one per exit layer
        self.projections = nn.ModuleList()
        #: where the deepest feature comes from, e.g. "output of 'block3'" (known after the probe)
        self.final_feature_source: Optional[str] = (
            f"output of {final_feature_layer!r}" if final_feature_layer is not None else None
        )
        self._final_key: Optional[str] = final_feature_layer  # the captured name of the deepest feature

    def student_layers(self) -> dict[str, int]:
        layers = {name: 0 for name in self.exit_layers}
        if self._final_key is not None:
            layers[self._final_key] = 0
        return layers

    @property
    def built(self) -> bool:
        return len(self.heads) == len(self.exit_layers) and self._final_key is not None

    @property
    def needs_probe(self) -> bool:
        return not self.built

    # ------------------------------------------------------------------ building
    def _trace(self, probe: Probe) -> list[tuple[str, Any, Any]]:
        """``(name, first input, output)`` of every submodule, in the order their forwards finish."""
        calls: list[tuple[str, Any, Any]] = []

        def recorder(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                calls.append((name, args[0] if args else None, output))

            return hook

        model = probe.student_model
        handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
        try:
            output = as_outputs(probe.call_student(), "the student").logits
        finally:
            for handle in handles:
                handle.remove()
        calls.append(("", probe.batch.input, output))
        return calls

    def build(self, probe: Probe) -> None:
        output = probe.student.logits
        if not isinstance(output, Tensor) or output.ndim != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"SelfDistillation needs a network producing [N, C] logits, got {shape}.")
        calls = self._trace(probe)
        finished: list[str] = []
        for name, _, _ in calls:
            if name in self.exit_layers and name not in finished:
                finished.append(name)
        if finished != self.exit_layers:
            raise ValueError(
                f"`exit_layers` must be listed shallow to deep, in the order the forward runs them: got "
                f"{self.exit_layers!r}, the forward finishes them as {finished!r}."
            )
        logits = calls[-1][2]
        if self.final_feature_layer is not None:
            final = next(out for n, _, out in calls if n == self.final_feature_layer)
        else:
            # the innermost module whose output *is* the logits: its input is the deepest feature
            producer = next(((n, inp) for n, inp, out in calls if n and out is logits and isinstance(inp, Tensor)), None)
            if producer is None:
                raise ValueError(
                    f"SelfDistillation could not find the module producing the logits of "
                    f"{type(probe.student_model).__name__} (its forward post-processes them); name the layer whose "
                    "output is the deepest feature with `final_feature_layer` (e.g. the pooling layer before the "
                    "classifier)."
                )
            name, final = producer
            self._final_key = name + INPUT_SUFFIX
            self.final_feature_source = f"input of {name!r}"
        if len(self.heads) > 0:
            return
        argument = "final_feature_layer" if self.final_feature_layer is not None else "exit_layers"
        _check_rank(self.final_feature_layer or str(self.final_feature_source), tuple(final.shape), argument)
        final_dim = int(_pool(final).shape[-1])
        captured = {n: out for n, _, out in calls if n in self.exit_layers}
        heads, projections = [], []
        for name in self.exit_layers:
            shape = tuple(captured[name].shape)
            _check_rank(name, shape, "exit_layers")
            heads.append(ExitHead(shape, self.width, probe.num_classes))
            projections.append(nn.Linear(self.width, final_dim))
        device = output.device
        self.heads = nn.ModuleList(heads).to(device).train(self.training)
        self.projections = nn.ModuleList(projections).to(device).train(self.training)

    # ------------------------------------------------------------------ heads
    def head_outputs(self, student: ModelOutputs) -> HeadOutputs:
        """Every head's logits (shallow to deep) and projected features, from the student's captured layers."""
        if not self.built:
            raise RuntimeError(
                "SelfDistillation's heads do not exist yet: they are built by a probe forward in setup(); "
                "run the module through a Trainer or call `module.build(example_input)` first."
            )
        head_logits, features = [], []
        for name, head, projection in zip(self.exit_layers, self.heads, self.projections):
            hidden = head.features(student.features[name])
            head_logits.append(head.classifier(hidden))
            features.append(projection(hidden))
        head_logits.append(student.logits)
        return HeadOutputs(head_logits, features, _pool(student.features[self._final_key]))

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        if student.logits.ndim != 2:
            raise ValueError(f"SelfDistillation needs [N, C] logits, got shape {tuple(student.logits.shape)}.")
        if any(name not in student.features for name in self.exit_layers):
            raise RuntimeError(
                "SelfDistillation.distillation_losses needs forward_models() to run first (it captures the exit layers)."
            )
        out = self.head_outputs(student)
        terms = self_distillation_loss(
            out.logits, batch.target, out.features, out.final_feature,
            self.temperature.value, self.alpha, self.feature_weight, self.ignore_index,
        )
        head_ce = terms.pop("head_ce")
        terms.update({f"head{i}_ce": ce for i, ce in enumerate(head_ce.unbind(0), start=1)})
        if self.weight != 1.0:
            terms["loss"] = self.weight * terms["loss"]
        return terms
