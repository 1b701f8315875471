"""``SelfDistillation``: "Be Your Own Teacher" (Zhang et al. 2019, arXiv:1905.08094)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torchmetrics
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.distiller import DistillationModule
from lightning_distill.objectives.self_distillation import AuxiliaryHeads, HeadOutputs, early_exit
from lightning_distill.strategies.base import reject_teacher_options
from lightning_distill.validation import check_float

__all__ = ["HeadOutputs", "SelfDistillation", "early_exit"]


class SelfDistillation(DistillationModule):
    r"""Be Your Own Teacher: auxiliary heads on a network's own layers, taught by its deepest head.

    There is **no teacher** (``self.teacher is None``). Every layer named in ``exit_layers`` (as
    in ``student.named_modules()``, listed shallow to deep) gets an auxiliary classifier, built
    from the shapes a probe forward finds in ``setup``: a small bottleneck for feature maps
    ``[N, C, H, W]`` (1x1 conv -> ``bottleneck_channels``, 3x3 conv, both with BN + ReLU, global
    pooling, linear), a two-layer MLP for ``[N, D]`` vectors. The network's own output is the
    deepest of the :math:`K = \text{len(exit\_layers)} + 1` heads. Each shallow head also gets a
    linear projection of its pooled feature to the dimension of the deepest feature
    :math:`F_K` -- the output of ``final_feature_layer`` (globally pooled when it is a map) or,
    by default, the input of the module that produces the network's logits (for ``DigitsCNN``:
    the dropped-out ``block3`` output; name ``block3`` to use it before dropout).

    .. math::

        \mathcal{L} = \sum_{i=1}^{K} (1 - \alpha)\,\mathrm{CE}(z_i, y)
            + \alpha\, T^2 \sum_{i=1}^{K-1} \mathrm{KL}\big(\mathrm{sg}[q_K^T] \,\|\, q_i^T\big)
            + \lambda \sum_{i=1}^{K-1} \mathrm{MSE}\big(P_i(f_i), \mathrm{sg}[F_K]\big)

    with :math:`q_i^T = \mathrm{softmax}(z_i / T)`, :math:`\mathrm{sg}` a stop-gradient
    (``detach``), KL :func:`~lightning_distill.losses.kd_loss` and MSE
    :func:`~lightning_distill.losses.mse_feature_loss`. This is the BYOT objective summed over all
    classifiers (the KL and hint terms of the deepest one with itself vanish), written in this
    library's conventions (``T**2`` on the KL, ``batchmean``). The objective is
    :class:`~lightning_distill.objectives.AuxiliaryHeads` (``byot``), built from the probe like every
    objective's trained parts.

    Defaults ``temperature=3``, ``alpha=0.3``, ``feature_weight=0.03`` are the argparse defaults
    of the authors' code (github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final,
    ``train.py``: ``--temperature 3.0``, ``--loss_coefficient 0.3``,
    ``--feature_loss_coefficient 0.03``). That code differs from the formula above in ways that
    change what those numbers mean, so they are a starting point, not a reproduction: it weighs
    the deepest head's CE by 1 (not ``1 - alpha``); its KD term is a soft-target cross-entropy
    (the same gradient as the KL) without the ``T**2`` factor, so ours is 9x stronger at ``T=3``; its hint term is ``torch.dist`` (the *unsquared* L2 norm over the whole batch, not a
    mean of squares) and skips one of the shallow heads; its heads are SepConv stacks with
    attention modules and its "ensemble" averages logits. A simpler recipe sometimes called
    self-distillation (T=4, weight 0.5, no hint term) is not the paper's method.

    Metrics (heads numbered 1 = shallowest ... ``K`` = deepest): ``train/loss``,
    ``train/task_loss`` (sum of the ``K`` CEs), ``train/kd_loss``, ``train/feature_loss`` (unweighted
    sums) and ``train/head{i}_ce``; ``val/acc`` (and ``val/loss``, ``val/ece``) of the deepest
    head, ``val/head{i}_acc``, ``val/ensemble_acc`` (argmax of the mean of the heads' softmaxes),
    and with ``exit_threshold`` set ``val/early_exit_acc`` and ``val/avg_exit_depth`` (mean
    1-based head number used); the same under ``test/``. Early exit is *evaluated* by computing
    every head and then selecting (:func:`early_exit`): it measures accuracy and depth, not the
    speed-up. Inference (``forward`` / ``predict``) returns the deepest head's logits;
    :meth:`predict_early_exit` returns the early-exit choice.

    Every head and projection is in the loss at every step (weights of 0 keep them in the graph),
    so DDP finds no unused parameters. Heads and projections are in the ``state_dict``
    (``objectives.byot.heads.*``); the probe's input spec is saved in checkpoints so
    ``load_from_checkpoint(path, student=...)`` rebuilds them before loading.

    Args:
        student: the network (trained from scratch or fine-tuned) producing ``[N, C]`` logits.
        exit_layers: names of the layers that get an auxiliary head, shallow to deep (checked at
            construction against ``named_modules()`` and against the forward order in ``setup``).
        final_feature_layer: layer whose output is the deepest feature :math:`F_K` (maps are
            globally average-pooled); ``None`` takes the input of the module producing the logits.
        temperature: ``T > 0`` of the KL term.
        alpha: weight in [0, 1] of the KL term; ``1 - alpha`` weighs each head's cross-entropy.
        feature_weight: :math:`\lambda \ge 0`, weight of the hint (feature) term.
        bottleneck_channels: width of every auxiliary head (channels for maps, hidden units for
            vectors).
        exit_threshold: confidence in ``[0, inf)`` for early exit (values above 1 never exit
            early); when set, validation / test also log the early-exit metrics.
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of :class:`~lightning_distill.distiller.DistillationModule`
            (there is no teacher, so no frozen-teacher options).

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsCNN
        >>> from lightning_distill.strategies.self_distillation import SelfDistillation
        >>> module = SelfDistillation(DigitsCNN(), exit_layers=["block1", "block2"],
        ...                           final_feature_layer="block3", bottleneck_channels=8)
        >>> module.build(torch.zeros(2, 1, 8, 8))  # what setup() does with a real batch
        >>> [tuple(p.weight.shape) for p in module.projections]
        [(64, 8), (64, 8)]
        >>> out = module.head_outputs(torch.zeros(2, 1, 8, 8))
        >>> len(out.logits), tuple(out.logits[0].shape), tuple(out.final_feature.shape)
        (3, (2, 10), (2, 64))
    """

    #: the heads' settings and parts by their familiar names (``module.heads``, ``module.projections``,
    #: ``module.exit_layers``, ``module.temperature``, ``module.alpha``, ``module.final_feature_source``, ...)
    exposes = ("byot",)

    def __init__(
        self,
        student: nn.Module,
        exit_layers: list[str],
        final_feature_layer: Optional[str] = None,
        temperature: float = 3.0,
        alpha: float = 0.3,
        feature_weight: float = 0.03,
        bottleneck_channels: int = 64,
        exit_threshold: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        reject_teacher_options(type(self), kwargs)
        if isinstance(exit_layers, str):
            exit_layers = [exit_layers]
        if not isinstance(exit_layers, (list, tuple)) or not exit_layers or not all(isinstance(n, str) for n in exit_layers):
            raise ValueError(
                f"`exit_layers` must be a non-empty list of layer names (as in student.named_modules()), "
                f"got {exit_layers!r}."
            )
        if len(set(exit_layers)) != len(exit_layers):
            raise ValueError(f"`exit_layers` lists a layer twice: {list(exit_layers)!r}.")
        _check_threshold(exit_threshold)
        heads = AuxiliaryHeads(exit_layers, final_feature_layer, temperature, alpha, feature_weight, bottleneck_channels)
        if final_feature_layer is not None:  # its own argument name in errors
            from lightning_distill.features import check_layer_names

            check_layer_names(student, [final_feature_layer], "the student", "final_feature_layer")
        super().__init__(student, None, objectives={"byot": heads}, **kwargs)
        self.exit_threshold = exit_threshold
        self.head_metrics: Optional[nn.ModuleDict] = None

    @property
    def byot(self) -> AuxiliaryHeads:
        return self.objectives["byot"]

    @property
    def bottleneck_channels(self) -> int:
        return self.byot.width

    @property
    def num_heads(self) -> int:
        """``K``: the auxiliary heads plus the network's own output."""
        return len(self.byot.exit_layers) + 1

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        metrics = super().build_metrics(num_classes, with_teacher)

        def accuracy() -> torchmetrics.Metric:
            return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")

        def collection() -> nn.ModuleDict:
            found: dict[str, torchmetrics.Metric] = {f"head{i}_acc": accuracy() for i in range(1, self.num_heads + 1)}
            found["ensemble_acc"] = accuracy()
            found["early_exit_acc"] = accuracy()
            found["avg_exit_depth"] = torchmetrics.MeanMetric()
            return nn.ModuleDict(found)

        self.head_metrics = nn.ModuleDict({"val": collection(), "test": collection()}).to(self.device)
        return metrics

    # ------------------------------------------------------------------ forward
    def head_outputs(self, inputs: Any) -> HeadOutputs:
        """One forward of the network with every head: logits (shallow to deep), projected features."""
        if not self.byot.built:
            raise RuntimeError(
                "SelfDistillation's heads do not exist yet: they are built by a probe forward in setup(); "
                "run the module through a Trainer or call `module.build(example_input)` first."
            )
        batch = inputs if isinstance(inputs, Batch) else Batch(inputs)
        if torch.is_inference_mode_enabled():
            # Trainer.validate / test run under inference_mode, whose tensors have no version counter (which
            # the feature capture reads to detect in-place changes): a plain no_grad forward instead
            with torch.inference_mode(False), torch.no_grad():
                return self.byot.head_outputs(self.student_outputs(batch))
        return self.byot.head_outputs(self.student_outputs(batch))

    def predict_early_exit(self, inputs: Any, threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """``(logits [N, C], exit_index [N])``: per sample the first head (shallow to deep) whose top
        softmax probability reaches ``threshold`` (default ``exit_threshold``), else the deepest.

        ``exit_index`` is 1-based (1 = shallowest head, ``K`` = the network's output). Every head is
        computed, then one is selected (see :func:`early_exit`); call ``module.eval()`` first for
        inference behaviour of BatchNorm / dropout.
        """
        threshold = self.exit_threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("predict_early_exit needs a threshold: pass `threshold` or set `exit_threshold`.")
        _check_threshold(threshold)
        return early_exit(self.head_outputs(inputs).logits, float(threshold))

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        logits = self.head_outputs(b).logits
        self.update_eval_metrics(stage, logits[-1], b.target, None)
        metrics = self.head_metrics[stage]
        n = int(logits[-1].shape[0])
        log: dict[str, torchmetrics.Metric] = {}
        exit_logits = exit_index = None
        if self.exit_threshold is not None:
            exit_logits, exit_index = early_exit(logits, float(self.exit_threshold))
            metrics["avg_exit_depth"].update(exit_index.float())
            log["avg_exit_depth"] = metrics["avg_exit_depth"]
        if b.target is not None:
            valid = b.target.reshape(-1) != self.ignore_index
            target = b.target.reshape(-1)[valid]
            if target.numel() > 0:
                for i, head in enumerate(logits, start=1):
                    metrics[f"head{i}_acc"].update(head.float()[valid], target)
                ensemble = torch.stack([head.float().softmax(-1) for head in logits]).mean(0)
                metrics["ensemble_acc"].update(ensemble[valid], target)
                if exit_logits is not None:
                    metrics["early_exit_acc"].update(exit_logits.float()[valid], target)
                names = [f"head{i}_acc" for i in range(1, self.num_heads + 1)] + ["ensemble_acc"]
                names += ["early_exit_acc"] if exit_logits is not None else []
                log.update({name: metrics[name] for name in names})
        if log:
            self.log_dict({f"{stage}/{k}": v for k, v in log.items()}, on_step=False, on_epoch=True, batch_size=n)


def _check_threshold(value: Any) -> None:
    if value is not None:
        check_float(
            "exit_threshold", value, 0.0,
            what="None or a finite number >= 0 (a softmax confidence; values above 1 never exit early)",
        )
