"""``Classifier``: plain supervised training, for teachers and for no-KD baselines."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from lightning_distill.batch import Batch, resolve_routing, unpack_batch
from lightning_distill.losses import cross_entropy_loss
from lightning_distill.module import TrainingModule
from lightning_distill.outputs import ModelOutputs, as_outputs

__all__ = ["Classifier"]


class Classifier(TrainingModule):
    """Train one network on hard labels with cross-entropy (optionally label-smoothed).

    Trains the teachers that distillation strategies load through ``teacher_checkpoint`` (its
    checkpoints store the network under ``model.``) and the no-KD baselines every strategy is
    compared with. Logs ``train/loss``; validation / test log ``val/acc``, ``val/acc_top5``
    (more than 5 classes), ``val/ece`` and ``val/loss``.

    Args:
        model: the network.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        inputs: how a batch reaches the model: ``"auto"`` (keyword inputs such as ``input_ids`` /
            ``attention_mask`` for models that take them by name, the positional tensor otherwise),
            ``"positional"``, ``"keywords"``, a :class:`~lightning_distill.batch.KeywordInputs` or a
            callable ``(model, batch) -> output`` (see :mod:`lightning_distill.batch`).
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of :class:`~lightning_distill.module.TrainingModule`.

    Example::

        >>> import lightning as L
        >>> from lightning_distill import Classifier
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsMLP
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(DigitsMLP()), datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, inputs: Any = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
        self.routing = resolve_routing(inputs, "inputs")
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"] + ([] if isinstance(inputs, str) else ["inputs"]))
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Any) -> Any:
        """The model's output for a model input (a dict of named inputs is routed by keyword)."""
        return self.routing(self.model, Batch(None, inputs=dict(inputs)) if isinstance(inputs, dict) else Batch(inputs))

    def logits(self, batch: Batch) -> Tensor:
        """The model's logits for ``batch`` (any output type, :func:`~lightning_distill.outputs.as_outputs`)."""
        return as_outputs(self.routing(self.model, batch), "the model").logits

    def task_loss(self, logits: Tensor, target: Optional[Tensor]) -> Tensor:
        return cross_entropy_loss(logits, target, self.ignore_index, self.label_smoothing)

    def probe_outputs(self, batch: Batch) -> tuple[ModelOutputs, None]:
        return as_outputs(self.routing(self.model, batch), "the model"), None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        b = self.read_batch(batch)
        loss = self.task_loss(self.logits(b), b.target)
        self.__dict__["_step_terms"] = {"task": loss}  # named if the loss turns non-finite (check_finite_loss)
        n = self.batch_size_of(b)
        self.log("train/task_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        if self.normalizes_tokens:  # the sum over labelled tokens; the optimizer step divides by the step's count
            return loss * self.token_counts(b)["labels"]
        return loss

    def eval_logits(self, batch: Batch) -> tuple[Tensor, None]:
        return self.logits(batch), None

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.logits(unpack_batch(batch))
