"""``TrainingModule``: what :class:`Classifier` and every distillation strategy share.

* batch unpacking -- ``(input, target)``, ``(input, target, index)`` or a dict;
* the hard-label task loss (cross-entropy with an ignore index, for ``[N, C]`` and ``[N, L, C]``);
* optimizer and LR-scheduler configuration injected as callables, so they work from YAML::

      model:
        init_args:
          optimizer:
            class_path: torch.optim.SGD
            init_args: {lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
          lr_scheduler:
            class_path: torch.optim.lr_scheduler.CosineAnnealingLR
            init_args: {T_max: 240}

  and from Python: ``optimizer=functools.partial(torch.optim.SGD, lr=0.05)``;
* validation / test metrics from torchmetrics (``val/acc``, ``val/acc_top5`` when there are more
  than 5 classes, ``val/ece``, ``val/loss``; ``val/perplexity`` for token-level logits
  ``[N, L, V]``, where accuracy and agreement are per valid token) and a shape probe before training.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["Batch", "OptimizerFactory", "Perplexity", "SchedulerFactory", "TrainingModule"]

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]

_INTERVALS = ("epoch", "step")


class Batch(NamedTuple):
    """A batch in the one shape every strategy reads.

    ``target`` may be ``None`` (no labels) and may contain ``ignore_index`` entries; ``mask``
    (``[N, L]``, True where valid) is for token-level data.
    """

    input: Any
    target: Optional[Tensor] = None
    index: Optional[Tensor] = None
    mask: Optional[Tensor] = None


_INPUT_KEYS = ("input", "inputs", "x", "input_ids", "image", "images")
_TARGET_KEYS = ("target", "targets", "y", "label", "labels")
_MASK_KEYS = ("mask", "attention_mask")


def unpack_batch(batch: Any) -> Batch:
    """Normalise a dataloader batch into a :class:`Batch`."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, dict):

        def first(keys: tuple[str, ...]) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        inp = first(_INPUT_KEYS)
        if inp is None:
            raise ValueError(f"a dict batch needs one of the keys {_INPUT_KEYS}, got keys {sorted(batch)}.")
        return Batch(inp, first(_TARGET_KEYS), batch.get("index"), first(_MASK_KEYS))
    if isinstance(batch, (tuple, list)):
        if 1 <= len(batch) <= 4:
            return Batch(*batch)
        raise ValueError(f"a tuple batch must be (input[, target[, index[, mask]]]), got {len(batch)} elements.")
    if isinstance(batch, Tensor):
        return Batch(batch)
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}.")


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"`{name}` must be one of {valid}, got {value!r}.")


class Perplexity(torchmetrics.MeanMetric):
    """exp of the mean token cross-entropy: update with per-token losses (``reduction="none"``).

    Unlike ``torchmetrics.text.Perplexity`` (which takes ``log(softmax(logits))`` and so returns
    ``inf`` for the whole epoch once one target's probability underflows float32), the per-token
    losses come from ``log_softmax`` and stay finite.
    """

    def compute(self) -> Tensor:
        return super().compute().exp()


class TrainingModule(L.LightningModule):
    """Base of :class:`Classifier` and :class:`DistillationModule` (not used directly).

    Args:
        optimizer: a callable taking parameter groups and returning an optimizer;
            ``None`` means ``torch.optim.Adam(lr=1e-3)``.
        lr_scheduler: a callable taking the optimizer and returning a scheduler, or ``None``.
        lr_scheduler_interval: ``"epoch"`` or ``"step"`` -- when the scheduler steps.
        lr_scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches.
        num_classes: optional; found by a probe forward before training when not given, and
            checked against the datamodule's ``num_classes`` when it has one.
        ignore_index: target value that marks a sample / token without a label.
    """

    def __init__(
        self,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        lr_scheduler_interval: str = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        num_classes: Optional[int] = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        _check_choice("lr_scheduler_interval", lr_scheduler_interval, _INTERVALS)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}.")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.eval_metrics: Optional[nn.ModuleDict] = None
        self.token_level = False  # set by the probe: logits [N, L, V] (language models)

    # ------------------------------------------------------------------ batches and losses
    unpack_batch = staticmethod(unpack_batch)

    def task_loss(self, logits: Tensor, target: Optional[Tensor]) -> Tensor:
        """Cross-entropy with hard labels, averaged over labelled samples / tokens only.

        ``[N, C]`` logits with ``[N]`` targets or ``[N, L, C]`` with ``[N, L]``; entries equal
        to ``ignore_index`` do not count. Returns 0 (not NaN) when nothing is labelled.
        """
        if target is None:
            return logits.new_zeros((), dtype=torch.float32)
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        flat_target = target.reshape(-1)
        total = F.cross_entropy(flat_logits, flat_target, ignore_index=self.ignore_index, reduction="sum")
        count = (flat_target != self.ignore_index).sum()
        return total / count.clamp_min(1)

    @staticmethod
    def batch_size_of(batch: Batch) -> int:
        inp = batch.input
        return int(inp.shape[0]) if isinstance(inp, Tensor) else len(inp)

    # ------------------------------------------------------------------ optimizers
    def parameter_groups(self) -> list[dict]:
        """Parameter groups handed to the optimizer: every trainable parameter by default.

        Strategies with their own learning rates (projections, temperatures) override this and
        return several groups; frozen modules never appear because their parameters have
        ``requires_grad=False`` and :meth:`frozen_parameters` filters them out as well.
        """
        frozen = {id(p) for p in self.frozen_parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]
        return [{"params": params}]

    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters that must never be optimised (a teacher's). None in the base class."""
        return ()

    def configure_optimizers(self) -> Any:
        groups = [g for g in self.parameter_groups() if len(g["params"]) > 0]
        frozen = {id(p) for p in self.frozen_parameters()}
        leaked = [n for n, p in self.named_parameters() if id(p) in frozen and any(p is q for g in groups for q in g["params"])]
        if leaked:
            raise RuntimeError(f"frozen parameters were put in an optimizer group: {leaked[:5]}")
        if not groups:
            raise ValueError("the module has no trainable parameters: nothing to optimise.")
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ probing and metrics
    def example_input(self) -> Any:
        """A small real input for shape probes: ``example_input_array`` or the datamodule's."""
        if self.example_input_array is not None:
            return self.example_input_array
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and callable(getattr(dm, "example_input", None)):
            return dm.example_input()
        if dm is not None:
            try:
                return unpack_batch(next(iter(dm.train_dataloader()))).input
            except Exception:  # noqa: BLE001 - a datamodule without a train loader (test-only use)
                pass
        return None

    def datamodule_num_classes(self) -> Optional[int]:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        value = getattr(dm, "num_classes", None)
        return int(value) if isinstance(value, int) else None

    def _check_num_classes(self, found: int, source: str) -> None:
        for name, expected in (("num_classes", self.num_classes), ("the datamodule's num_classes", self.datamodule_num_classes())):
            if expected is not None and expected != found:
                raise ValueError(
                    f"{source} predicts {found} classes but {name} is {expected}. Build the model with "
                    f"num_classes={expected} (init_args.num_classes in YAML) or use matching data."
                )

    @property
    def has_teacher(self) -> bool:
        return getattr(self, "teacher", None) is not None

    def setup(self, stage: str) -> None:
        """Probe the models on a real input before training starts, then build the metrics.

        Rejects a class-count mismatch (model vs teacher vs datamodule) before any step runs.
        Strategies that create layers from probed shapes extend :meth:`on_probe`, which runs
        while the module is still on the CPU and before the optimizer exists, so whatever it
        creates is moved, optimised and checkpointed like any other submodule.
        """
        if self.eval_metrics is not None:
            return
        example = self.example_input()
        if example is None:
            if self.num_classes is None:
                raise ValueError(
                    f"{type(self).__name__} could not find an example input to probe the models: pass "
                    "`num_classes`, set `example_input_array`, or use a datamodule with `example_input()`."
                )
            num_classes = self.num_classes
        else:
            num_classes = self.on_probe(example, *self.probe(example))
        self.eval_metrics = self.build_metrics(num_classes, with_teacher=self.has_teacher)

    def probe(self, example: Any) -> tuple[Any, Any]:
        """:meth:`probe_outputs` in eval mode under no_grad (no BatchNorm update, no RNG use);
        every submodule's train/eval flag is restored exactly afterwards."""
        modes = [(m, m.training) for m in self.modules()]
        nn.Module.train(self, False)
        try:
            with torch.no_grad():
                return self.probe_outputs(example)
        finally:
            for module, training in modes:
                module.training = training

    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        """``(trained model output, teacher output or None)`` for ``example``."""
        raise NotImplementedError

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        """Check the probed output shapes; return the number of classes. Extend in subclasses."""
        n_out = int(output.shape[-1])
        trained = getattr(self, "student", None) or getattr(self, "model", None)
        self.token_level = output.ndim == 3
        if teacher_output is not None:
            n_teacher = int(teacher_output.shape[-1])
            if n_teacher != n_out and self.token_level:
                raise ValueError(
                    f"teacher and student have different vocabulary sizes: the teacher "
                    f"({type(self.teacher).__name__}) outputs {n_teacher} logits per token, the student "
                    f"({type(trained).__name__}) outputs {n_out}. Token-level distillation compares the "
                    "two distributions token by token, so both must use the same tokenizer: build both "
                    "with the same vocab_size (init_args.vocab_size in YAML)."
                )
            if n_teacher != n_out:
                raise ValueError(
                    f"teacher and student disagree on the number of classes: the teacher "
                    f"({type(self.teacher).__name__}) outputs {n_teacher}, the student "
                    f"({type(trained).__name__}) outputs {n_out}. Build both with the same "
                    "num_classes (init_args.num_classes in YAML)."
                )
        self._check_num_classes(n_out, f"the model ({type(trained).__name__})")
        self.num_classes = n_out
        return n_out

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """One metric collection per evaluation stage (``val``, ``test``)."""

        def collection() -> nn.ModuleDict:
            metrics = {
                "acc": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "ece": torchmetrics.classification.MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
                "loss": torchmetrics.MeanMetric(),
            }
            if getattr(self, "token_level", False):
                # exp of the mean cross-entropy over valid tokens (labels != ignore_index), see Perplexity
                metrics["perplexity"] = Perplexity()
            if num_classes > 5:
                metrics["acc_top5"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=5, average="micro")
            if with_teacher and getattr(self, "token_level", False):
                metrics["teacher_perplexity"] = Perplexity()
            if with_teacher:
                metrics["agreement"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")
                metrics["kl"] = torchmetrics.MeanMetric()
                metrics["teacher_acc"] = torchmetrics.classification.MulticlassAccuracy(
                    num_classes, top_k=1, average="micro"
                )
            return nn.ModuleDict(metrics)

        return nn.ModuleDict({"val": collection(), "test": collection()})

    def update_eval_metrics(
        self, stage: str, logits: Tensor, target: Optional[Tensor], teacher_logits: Optional[Tensor] = None
    ) -> None:
        """Update and log ``{stage}/acc``, ``/acc_top5``, ``/ece``, ``/loss`` (+ teacher metrics).

        ``{stage}/loss`` is the student's cross-entropy with the labels (comparable across
        strategies and with the no-KD baseline), ``{stage}/agreement`` the share of samples where
        the student's top-1 equals the teacher's, ``{stage}/kl`` the mean KL(p_T || p_S) at T=1.
        """
        from lightning_distill.losses import kl_per_position

        metrics = self.eval_metrics[stage]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        flat_teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() if teacher_logits is not None else None
        n = flat.shape[0]
        if target is not None:
            flat_target = target.reshape(-1)
            valid = flat_target != self.ignore_index
            if not bool(valid.all()):
                flat, flat_target = flat[valid], flat_target[valid]
                flat_teacher = flat_teacher[valid] if flat_teacher is not None else None
            if flat.shape[0] > 0:
                metrics["acc"].update(flat, flat_target)
                metrics["ece"].update(flat.softmax(-1), flat_target)
                token_ce = F.cross_entropy(flat, flat_target, reduction="none")
                metrics["loss"].update(token_ce.mean(), weight=flat.shape[0])
                if "perplexity" in metrics:
                    metrics["perplexity"].update(token_ce)
                if "acc_top5" in metrics:
                    metrics["acc_top5"].update(flat, flat_target)
                if flat_teacher is not None and "teacher_acc" in metrics:
                    metrics["teacher_acc"].update(flat_teacher, flat_target)
                if flat_teacher is not None and "teacher_perplexity" in metrics:
                    metrics["teacher_perplexity"].update(F.cross_entropy(flat_teacher, flat_target, reduction="none"))
        if flat_teacher is not None and "agreement" in metrics and flat.shape[0] > 0:
            metrics["agreement"].update(flat, flat_teacher.argmax(-1))
            metrics["kl"].update(kl_per_position(flat, flat_teacher, 1.0, "forward"))
        self.log_dict(
            {f"{stage}/{name}": metric for name, metric in metrics.items() if name != "acc"},
            on_step=False,
            on_epoch=True,
            batch_size=n,
            prog_bar=False,
        )
        self.log(f"{stage}/acc", metrics["acc"], on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
