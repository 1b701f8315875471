"""``SelfDistillation``: "Be Your Own Teacher" (Zhang et al. 2019, arXiv:1905.08094)."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torchmetrics
from torch import Tensor, nn

from lightning_distill.features import FeatureCapture, check_layer_names
from lightning_distill.losses import self_distillation_loss
from lightning_distill.module import Batch
from lightning_distill.strategies.base import DistillationModule, check_alpha, check_temperature

__all__ = ["HeadOutputs", "SelfDistillation", "early_exit"]


# =============================================================================================
# Early exit
# =============================================================================================


def early_exit(head_logits: Sequence[Tensor], threshold: float) -> tuple[Tensor, Tensor]:
    """Per sample, the first head (shallow to deep) whose top softmax probability is ``>= threshold``.

    Samples on which no shallow head is confident enough use the deepest head, whatever its own
    confidence. Threshold 0 therefore sends every sample out at head 1, a threshold above 1 sends
    every sample to the deepest head.

    Args:
        head_logits: ``K`` tensors ``[N, C]``, shallow to deep.
        threshold: confidence needed to leave at a shallow head.

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


# =============================================================================================
# Heads and capture helpers
# =============================================================================================


class HeadOutputs(NamedTuple):
    """Everything one forward of :meth:`SelfDistillation.head_outputs` gives.

    Attributes:
        logits: ``K`` tensors ``[N, C]``, shallow to deep; the last is the network's own output.
        features: ``K - 1`` tensors ``[N, D]``: the shallow heads' features after their projection.
        final_feature: ``[N, D]``: the deepest feature (the input of the network's classifier,
            or the pooled output of ``final_feature_layer``).
    """

    logits: list[Tensor]
    features: list[Tensor]
    final_feature: Tensor


class _ExitHead(nn.Module):
    """Auxiliary classifier on one intermediate layer.

    ``[N, C, H, W]``: 1x1 conv ``C -> width`` + BN + ReLU, 3x3 conv ``width -> width`` (stride 1)
    + BN + ReLU, global average pooling, flatten. ``[N, D]``: ``Linear(D, width)`` + ReLU. Then
    ``classifier = Linear(width, num_classes)``; ``features`` gives the pooled ``[N, width]``
    feature that the hint projection reads.
    """

    def __init__(self, in_shape: tuple[int, ...], width: int, num_classes: int) -> None:
        super().__init__()
        if len(in_shape) == 4:
            c = in_shape[1]
            self.features = nn.Sequential(
                nn.Conv2d(c, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        else:
            self.features = nn.Sequential(nn.Linear(in_shape[-1], width), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _InputCapture:
    """A forward pre-hook that keeps the first positional input of one module while active."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        self.value: Optional[Tensor] = None
        self._active = False
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: Any) -> None:
        if self._active and args and isinstance(args[0], Tensor):
            self.value = args[0]

    def __enter__(self) -> "_InputCapture":
        self.value, self._active = None, True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False

    def pop(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"the input of {self.name!r} was not captured: was the module called in the forward?")
        return value


def _pool(feature: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, C]`` by global average pooling; ``[N, D]`` unchanged."""
    return feature.mean(dim=(2, 3)) if feature.ndim == 4 else feature


def _check_rank(name: str, shape: tuple[int, ...], argument: str) -> None:
    if len(shape) not in (2, 4):
        raise ValueError(
            f"`{argument}`: layer {name!r} outputs shape {shape}; SelfDistillation builds heads on "
            "[N, C, H, W] feature maps or [N, D] vectors only. Pick another layer."
        )


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
    library's conventions (``T**2`` on the KL, ``batchmean``, DESIGN.md §2).

    Defaults ``temperature=3``, ``alpha=0.3``, ``feature_weight=0.03`` are the argparse defaults
    of the authors' code (github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final,
    ``train.py``: ``--temperature 3.0``, ``--loss_coefficient 0.3``,
    ``--feature_loss_coefficient 0.03``). That code differs from the formula above in ways that
    change what those numbers mean, so they are a starting point, not a reproduction: it weighs
    the deepest head's CE by 1 (not ``1 - alpha``); its KD term is a soft-target cross-entropy
    (the same gradient as the KL) without the ``T**2`` factor, so ours is 9x stronger at ``T=3``; its hint term is ``torch.dist`` (the *unsquared* L2 norm over the whole batch, not a
    mean of squares) and skips one of the shallow heads; its heads are SepConv stacks with
    attention modules and its "ensemble" averages logits. Seed 001's sketch (T=4, weight 0.5, no
    hint term) is not the paper's method.

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
    so DDP finds no unused parameters. Heads and projections are in the ``state_dict``; the
    probe's input shape is saved in checkpoints so ``load_from_checkpoint(path, student=...)``
    rebuilds them before loading.

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
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of :class:`DistillationModule`.

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
        if kwargs.get("teacher") is not None:
            raise ValueError(
                "SelfDistillation has no teacher (the network's deepest head teaches its shallower ones); "
                "remove `teacher`. For a frozen teacher use KnowledgeDistillation or FeatureDistillation."
            )
        if isinstance(exit_layers, str):
            exit_layers = [exit_layers]
        if not isinstance(exit_layers, (list, tuple)) or not exit_layers or not all(isinstance(n, str) for n in exit_layers):
            raise ValueError(
                f"`exit_layers` must be a non-empty list of layer names (as in student.named_modules()), "
                f"got {exit_layers!r}."
            )
        if len(set(exit_layers)) != len(exit_layers):
            raise ValueError(f"`exit_layers` lists a layer twice: {list(exit_layers)!r}.")
        temperature = check_temperature(temperature)
        alpha = check_alpha(alpha)
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, numbers.Real) or not (
            0 <= float(feature_weight) < math.inf
        ):
            raise ValueError(f"`feature_weight` (lambda of the hint term) must be a finite number >= 0, got {feature_weight!r}.")
        if isinstance(bottleneck_channels, bool) or not isinstance(bottleneck_channels, int) or bottleneck_channels < 1:
            raise ValueError(f"`bottleneck_channels` must be an integer >= 1, got {bottleneck_channels!r}.")
        _check_threshold(exit_threshold)
        kwargs.pop("teacher", None)
        super().__init__(student, None, **kwargs)
        self.exit_layers = [str(n) for n in exit_layers]
        self.final_feature_layer = final_feature_layer
        self.temperature = temperature
        self.alpha = alpha
        self.feature_weight = float(feature_weight)
        self.bottleneck_channels = bottleneck_channels
        self.exit_threshold = exit_threshold
        check_layer_names(student, self.exit_layers, "the student", "exit_layers")
        if final_feature_layer is not None:
            check_layer_names(student, [final_feature_layer], "the student", "final_feature_layer")
        captured = self.exit_layers + ([final_feature_layer] if final_feature_layer is not None else [])
        self._capture = FeatureCapture(student, captured, None, "the student", "exit_layers")
        self._input_capture: Optional[_InputCapture] = None  # default final feature, set by the probe
        #: where the deepest feature comes from, e.g. "output of 'block3'" (known after the probe)
        self.final_feature_source: Optional[str] = (
            f"output of {final_feature_layer!r}" if final_feature_layer is not None else None
        )
        self.heads = nn.ModuleList()  # filled by the probe in setup(), one per exit layer
        self.projections = nn.ModuleList()
        self.head_metrics: Optional[nn.ModuleDict] = None
        self._probed: Optional[tuple[dict[str, Tensor], list[tuple[str, Any]], Tensor]] = None
        self._outputs: Optional[HeadOutputs] = None
        self._probe_input: Optional[tuple[list[int], str]] = None

    @property
    def num_heads(self) -> int:
        """``K``: the auxiliary heads plus the network's own output."""
        return len(self.exit_layers) + 1

    # ------------------------------------------------------------------ building from a probe
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        calls: list[tuple[str, Any]] = []  # (name, (first input, output)) in the order forwards finish

        def recorder(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                calls.append((name, (args[0] if args else None, output)))

            return hook

        handles = [m.register_forward_hook(recorder(n)) for n, m in self.student.named_modules() if n]
        try:
            with self._capture:
                output = self.student(example)
        finally:
            for handle in handles:
                handle.remove()
        self._probed = (self._capture.pop(), calls, output)
        return output, None

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        if not isinstance(output, Tensor) or output.ndim != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"SelfDistillation needs a network producing [N, C] logits, got {shape}.")
        num_classes = super().on_probe(example, output, teacher_output)
        captured, calls, _ = self._probed
        self._probed = None
        if isinstance(example, Tensor):
            self._probe_input = (list(example.shape), str(example.dtype).replace("torch.", ""))
        self._check_order(calls)
        final = self._probe_final_feature(captured, calls, output)
        if len(self.heads) == 0:
            self._build_heads(captured, final, num_classes)
        return num_classes

    def _check_order(self, calls: list[tuple[str, Any]]) -> None:
        finished: list[str] = []
        for name, _ in calls:
            if name in self.exit_layers and name not in finished:
                finished.append(name)
        if finished != self.exit_layers:
            raise ValueError(
                f"`exit_layers` must be listed shallow to deep, in the order the forward runs them: got "
                f"{self.exit_layers!r}, the forward finishes them as {finished!r}."
            )

    def _probe_final_feature(self, captured: dict[str, Tensor], calls: list[tuple[str, Any]], output: Tensor) -> Tensor:
        if self.final_feature_layer is not None:
            return captured[self.final_feature_layer]
        if self._input_capture is not None:
            name = self._input_capture.name
            return next(inp for n, (inp, _) in calls if n == name)
        # the innermost module whose output *is* the logits: its input is the deepest feature
        producer = next(((n, inp) for n, (inp, out) in calls if out is output and isinstance(inp, Tensor)), None)
        if producer is None:
            raise ValueError(
                f"SelfDistillation could not find the module producing the logits of {type(self.student).__name__} "
                "(its forward post-processes them); name the layer whose output is the deepest feature with "
                "`final_feature_layer` (e.g. the pooling layer before the classifier)."
            )
        name, inp = producer
        self._input_capture = _InputCapture(dict(self.student.named_modules())[name], name)
        self.final_feature_source = f"input of {name!r}"
        return inp

    def _build_heads(self, captured: dict[str, Tensor], final: Tensor, num_classes: int) -> None:
        argument = "final_feature_layer" if self.final_feature_layer is not None else "exit_layers"
        _check_rank(self.final_feature_layer or str(self.final_feature_source), tuple(final.shape), argument)
        final_dim = int(_pool(final).shape[-1])
        heads, projections = [], []
        for name in self.exit_layers:
            shape = tuple(captured[name].shape)
            _check_rank(name, shape, "exit_layers")
            heads.append(_ExitHead(shape, self.bottleneck_channels, num_classes))
            projections.append(nn.Linear(self.bottleneck_channels, final_dim))
        self.heads = nn.ModuleList(heads).train(self.training)
        self.projections = nn.ModuleList(projections).train(self.training)

    def build(self, example_input: Any) -> None:
        """Probe on ``example_input`` now and create the heads (for use before ``load_state_dict``)."""
        self.on_probe(example_input, *self.probe(example_input))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if len(self.heads) == 0:
            raise ValueError(
                "SelfDistillation builds its heads from a probe forward and found no example input: set "
                "`example_input_array`, use a datamodule with `example_input()`, or call `module.build(x)` first."
            )
        if self.head_metrics is None:
            self.head_metrics = self._build_head_metrics(int(self.num_classes))

    def _build_head_metrics(self, num_classes: int) -> nn.ModuleDict:
        def accuracy() -> torchmetrics.Metric:
            return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")

        def collection() -> nn.ModuleDict:
            metrics: dict[str, torchmetrics.Metric] = {f"head{i}_acc": accuracy() for i in range(1, self.num_heads + 1)}
            metrics["ensemble_acc"] = accuracy()
            metrics["early_exit_acc"] = accuracy()
            metrics["avg_exit_depth"] = torchmetrics.MeanMetric()
            return nn.ModuleDict(metrics)

        return nn.ModuleDict({"val": collection(), "test": collection()})

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        shape, dtype = self._probe_input if self._probe_input else (None, None)
        checkpoint["self_distillation_probe_input_shape"] = shape
        checkpoint["self_distillation_probe_input_dtype"] = dtype

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shape = checkpoint.get("self_distillation_probe_input_shape")
        if len(self.heads) == 0 and shape:
            dtype = getattr(torch, checkpoint.get("self_distillation_probe_input_dtype") or "float32")
            self.build(torch.zeros(shape, dtype=dtype))  # rebuild the heads so their weights can load

    # ------------------------------------------------------------------ forward
    def head_outputs(self, inputs: Any) -> HeadOutputs:
        """One forward of the network with every head: logits (shallow to deep), projected features."""
        if len(self.heads) == 0:
            raise RuntimeError(
                "SelfDistillation's heads do not exist yet: they are built by a probe forward in setup(); "
                "run the module through a Trainer or call `module.build(example_input)` first."
            )
        if torch.is_inference_mode_enabled():
            # Trainer.validate / test run under inference_mode, whose tensors have no version counter
            # (which FeatureCapture reads to detect in-place changes): a plain no_grad forward instead
            with torch.inference_mode(False), torch.no_grad():
                return self._head_outputs(inputs)
        return self._head_outputs(inputs)

    def _head_outputs(self, inputs: Any) -> HeadOutputs:
        if self._input_capture is not None:
            with self._capture, self._input_capture:
                logits = self.student(inputs)
            final = self._input_capture.pop()
            captured = self._capture.pop()
        else:
            with self._capture:
                logits = self.student(inputs)
            captured = self._capture.pop()
            final = captured[self.final_feature_layer]
        head_logits, features = [], []
        for name, head, projection in zip(self.exit_layers, self.heads, self.projections):
            hidden = head.features(captured[name])
            head_logits.append(head.classifier(hidden))
            features.append(projection(hidden))
        head_logits.append(logits)
        return HeadOutputs(head_logits, features, _pool(final))

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

    # ------------------------------------------------------------------ training
    def forward_models(self, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        self._outputs = self.head_outputs(inputs)
        return self._outputs.logits[-1], None

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        if self._outputs is None:
            raise RuntimeError("SelfDistillation.distillation_losses needs forward_models() to run first.")
        out, self._outputs = self._outputs, None
        if student_logits.ndim != 2:
            raise ValueError(f"SelfDistillation needs [N, C] logits, got shape {tuple(student_logits.shape)}.")
        terms = self_distillation_loss(
            out.logits, batch.target, out.features, out.final_feature,
            self.temperature, self.alpha, self.feature_weight, self.ignore_index,
        )
        head_ce = terms.pop("head_ce")
        terms.update({f"head{i}_ce": ce for i, ce in enumerate(head_ce.unbind(0), start=1)})
        return terms

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.unpack_batch(batch)
        logits = self.head_outputs(b.input).logits
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
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
        raise ValueError(
            f"`exit_threshold` must be None or a finite number >= 0 (a softmax confidence; values above 1 "
            f"never exit early), got {value!r}."
        )
