"""``BornAgain``: Furlanello et al. (ICML 2018), "Born-Again Neural Networks" (arXiv:1805.04770)."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn

from lightning_distill.batch import Batch, unpack_batch
from lightning_distill.outputs import as_outputs
from lightning_distill.strategies.base import SingleTeacherDistillation
from lightning_distill.strategies.kd import KDPreset, kd_objectives
from lightning_distill.teachers import FrozenTeacher
from lightning_distill.validation import check_int

__all__ = ["BornAgain"]

#: Key of this strategy's own entry in a Lightning checkpoint.
_CKPT_KEY = "born_again"


def _generation_seed(seed: int, generation: int) -> int:
    """A deterministic seed for ``(seed, generation)`` (distinct generations get distinct seeds)."""
    return (seed * 1_000_003 + generation) % (2**63 - 1)


def reset_module_parameters(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module`` in place: ``reset_parameters()`` on every submodule that has it.

    Runs under a forked RNG seeded with ``seed``, so the result depends only on ``seed`` and the
    global random stream is left untouched. BatchNorm's ``reset_parameters`` also resets its
    running statistics. Parameters owned by a module without ``reset_parameters`` keep their
    values; a warning names them. Shared by :class:`BornAgain` (each new generation) and
    :class:`~lightning_distill.strategies.mutual.MutualLearning` (the students' copies).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    covered: set[int] = set()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters())
    skipped = [name for name, p in module.named_parameters() if id(p) not in covered]
    if skipped:
        warnings.warn(
            f"could not re-initialise {len(skipped)} parameter(s) of {type(module).__name__} whose module has "
            f"no `reset_parameters()`: {skipped[:5]}. They keep their current values.",
            stacklevel=2,
        )


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False``, no ``.grad`` and eval mode."""
    frozen = copy.deepcopy(module)
    for p in frozen.parameters():
        p.grad = None
    frozen.requires_grad_(False)
    frozen.eval()
    return frozen


class BornAgain(KDPreset, SingleTeacherDistillation):
    r"""Born-Again Networks: generations of one architecture, each distilled from the previous one.

    Generation 1 learns from the labels (or, when ``teacher`` is given, distills from it).
    Generation :math:`k \ge 2` is the same architecture, freshly re-initialised, trained with

    .. math::

        \mathcal{L}_k = (1 - \alpha)\,\mathrm{CE}(z_k, y)
                        + \alpha\, T^2\, D\big(\mathrm{softmax}(z_{k-1}/T),\ \mathrm{softmax}(z_k/T)\big)

    where :math:`z_{k-1}` are the logits of the finished generation :math:`k-1` -- the frozen
    teacher -- and :math:`D` the divergence chosen by ``kl``
    (:func:`lightning_distill.losses.kd_loss`): as in the paper, each new student learns both to
    predict the labels and to match its teacher's output distribution (``alpha=1``: teacher only).

    **All generations run in one** ``trainer.fit`` with ``max_epochs = generations *
    epochs_per_generation`` (checked in ``setup``). The hand-over happens at the start of the
    first epoch of each new generation (``on_train_epoch_start``), so it is resume-safe: a
    checkpoint written at the end of a generation's last epoch resumes into the hand-over. It

    1. appends a frozen copy of the finished student to :attr:`generation_models` (eval,
       ``requires_grad=False``, never in an optimizer) and writes its state dict to
       ``generation_{k}.pt`` next to the checkpoints (the ``ModelCheckpoint`` directory, else
       ``trainer.log_dir``, which is ``default_root_dir`` without a logger);
    2. makes that copy the :attr:`teacher` (a :class:`~lightning_distill.teachers.FrozenTeacher`) -- it
       obeys the full teacher contract (frozen, eval, no_grad forward, bit-identical);
    3. re-initialises the student in place (``reset_parameters()`` on every submodule that has
       it, under an RNG seeded by ``(seed, generation)``);
    4. **restarts the optimizer and the LR scheduler**: ``trainer.strategy.setup_optimizers``
       calls :meth:`configure_optimizers` again, so Adam / momentum state is empty and the
       learning rate and schedule start from their initial values (schedules such as
       ``CosineAnnealingLR`` should therefore span ``epochs_per_generation`` epochs).

    The last generation is the student itself (``forward``, ``predict`` and exports use it);
    its weights go to ``generation_{G}.pt`` when ``fit`` ends. :attr:`generation_models` holds
    generations ``1 .. k-1`` while generation ``k`` trains.

    Logging: ``train/loss``, ``train/task_loss``, ``train/kd_loss`` (0 while generation 1 has no
    teacher), ``train/generation``; at validation ``val/acc`` (current student),
    ``val/gen{k}_acc`` (the same value under the current generation's name) and
    ``val/ensemble_acc`` -- BANE, the mean of the softmax outputs of all finished generations and
    the current student; at the end of training it is the ensemble of every generation.
    ``test/ensemble_acc`` likewise on the test set.

    Checkpoints hold the generation counter, the seed, every finished generation and the current
    teacher when it is a previous generation (a user-given teacher stays out, as for every
    strategy, unless ``save_teacher=True``). :meth:`on_load_checkpoint` rebuilds the
    generation modules before the weights load, so resuming mid-generation reproduces an
    uninterrupted run.

    Args:
        student: the architecture of every generation (generation 1 starts from its current
            weights).
        generations: number of generations G >= 1.
        epochs_per_generation: epochs of each generation; ``None`` takes
            ``trainer.max_epochs / generations`` (which must divide evenly).
        teacher: optional frozen teacher of generation 1; ``None`` trains generation 1 from the
            labels only.
        teacher_checkpoint: weights for ``teacher`` (see
            :class:`~lightning_distill.strategies.base.SingleTeacherDistillation`).
        temperature: softmax temperature ``T > 0`` of the KD term.
        alpha: weight of the KD term in [0, 1]; ``1 - alpha`` weighs the labels.
        kl: ``"forward"`` (Hinton), ``"reverse"``, ``"symmetric"`` or ``"js"``.
        seed: seed of the re-initialisations; ``None`` takes ``torch.initial_seed()`` at
            construction (``seed_everything`` / the CLI's ``seed_everything``). Saved in
            checkpoints.
        **kwargs: ``optimizer``, ``lr_scheduler``, ``save_teacher``, ... of
            :class:`~lightning_distill.strategies.base.SingleTeacherDistillation`.

    Example::

        >>> import lightning as L
        >>> from lightning_distill.strategies.born_again import BornAgain
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsMLP
        >>> module = BornAgain(DigitsMLP(), generations=3, epochs_per_generation=10, alpha=0.5, seed=0)
        >>> module.generation, len(module.generation_models), module.teacher is None
        (1, 0, True)
        >>> trainer = L.Trainer(max_epochs=30, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> module.generation, len(module.generation_models)  # doctest: +SKIP
        (3, 2)
    """

    supports_teacher_cache = False  # the teacher changes at every generation

    def __init__(
        self,
        student: nn.Module,
        generations: int = 3,
        epochs_per_generation: Optional[int] = None,
        teacher: Optional[nn.Module] = None,
        teacher_checkpoint: Optional[str] = None,
        temperature: float = 1.0,
        alpha: float = 0.5,
        kl: str = "forward",
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        check_int("generations", generations, minimum=1, hint=" Use 1 for a single (plain or distilled) training run.")
        if epochs_per_generation is not None:
            check_int(
                "epochs_per_generation", epochs_per_generation, minimum=1,
                hint=" Pass None to use trainer.max_epochs / generations.",
            )
        if seed is not None:
            check_int("seed", seed, minimum=0, what="an integer >= 0 or None")
        super().__init__(
            student, teacher, teacher_checkpoint=teacher_checkpoint,
            objectives=kd_objectives(alpha, temperature, kl), **kwargs,
        )
        self.generations = generations
        self.epochs_per_generation = epochs_per_generation
        self.seed = int(seed) if seed is not None else int(torch.initial_seed() % (2**31))
        #: the generation being trained (1-based)
        self.generation = 1
        #: frozen copies of the finished generations 1 .. generation-1
        self.generation_models = nn.ModuleList()
        #: files written for finished generations, in order
        self.generation_paths: list[str] = []
        self._user_source = (self.teacher_source,)  # a tuple: the user's teacher, restored by rebuild_generations
        self._resolved_epochs: Optional[int] = epochs_per_generation

    # ------------------------------------------------------------------ teacher contract
    def frozen_parameters(self):
        params = list(super().frozen_parameters())
        return params + list(self.generation_models.parameters())

    def train(self, mode: bool = True) -> "BornAgain":
        super().train(mode)
        if "generation_models" in self._modules:
            self.generation_models.eval()  # previous generations are always in eval mode
        return self

    def eval_mode_modules(self) -> set[int]:
        return super().eval_mode_modules() | {id(m) for m in self.generation_models.modules()}

    # ------------------------------------------------------------------ schedule
    @property
    def total_epochs(self) -> Optional[int]:
        """``generations * epochs_per_generation`` once known."""
        return None if self._resolved_epochs is None else self.generations * self._resolved_epochs

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._check_schedule()
        super().setup(stage)

    def _check_schedule(self) -> None:
        trainer = self.trainer
        if self.generations > 1 and type(trainer.strategy).setup_optimizers is not Strategy.setup_optimizers:
            raise ValueError(
                f"BornAgain restarts the optimizer at every generation through `Strategy.setup_optimizers`, which "
                f"{type(trainer.strategy).__name__} overrides (it wraps its optimizers); use a single-device or DDP "
                "strategy, or run one generation per fit (generations=1 with the previous generation as teacher)."
            )
        if trainer.fast_dev_run:
            self._resolved_epochs = self.epochs_per_generation or 1
            return
        max_epochs = trainer.max_epochs
        g, e = self.generations, self.epochs_per_generation
        if e is None and g == 1:  # a single generation: any schedule (no hand-over)
            self._resolved_epochs = max_epochs if max_epochs is not None and max_epochs > 0 else None
            return
        if e is None:
            if max_epochs is None or max_epochs < g or max_epochs % g != 0:
                raise ValueError(
                    f"BornAgain with `epochs_per_generation=None` needs `trainer.max_epochs` to be a positive "
                    f"multiple of `generations`={g}, got max_epochs={max_epochs!r}. Set trainer.max_epochs to "
                    f"generations x epochs per generation (e.g. {g * 10}) or pass `epochs_per_generation`."
                )
            self._resolved_epochs = max_epochs // g
            return
        if max_epochs != g * e:
            raise ValueError(
                f"BornAgain runs all generations in one fit: `trainer.max_epochs` must equal generations x "
                f"epochs_per_generation = {g} x {e} = {g * e}, got max_epochs={max_epochs!r}. Set "
                f"trainer.max_epochs: {g * e} (--trainer.max_epochs {g * e}) or change `generations` / "
                "`epochs_per_generation`."
            )
        self._resolved_epochs = e

    def on_train_epoch_start(self) -> None:
        if self._resolved_epochs is None:
            return
        target = min(self.current_epoch // self._resolved_epochs + 1, self.generations)
        while self.generation < target:
            self._next_generation()

    def on_train_end(self) -> None:
        super().on_train_end()
        trainer = self.trainer
        if self.total_epochs is not None and not trainer.fast_dev_run and trainer.current_epoch >= self.total_epochs:
            self._save_generation_file(self.generation, self.student)

    # ------------------------------------------------------------------ hand-over
    def _next_generation(self) -> None:
        """Freeze the finished student as the next teacher, re-initialise it, restart the optimizer."""
        finished = _frozen_copy(self.student)
        self.generation_models.append(finished)
        self._save_generation_file(self.generation, finished)
        self._set_teacher(FrozenTeacher(finished, save=True, inputs=self.student_routing))
        self.generation += 1
        self.reinitialize_student(self.generation)
        self._restart_optimizers()

    def reinitialize_student(self, generation: int) -> None:
        """Re-initialise the student for ``generation`` (deterministic in ``(seed, generation)``)."""
        reset_module_parameters(self.student, _generation_seed(self.seed, generation))
        for p in self.student.parameters():
            p.grad = None

    def _set_teacher(self, source: Optional[FrozenTeacher]) -> None:
        """The teacher of the current generation: the user's (generation 1) or the previous generation,
        which -- unlike the user's -- is not re-creatable from the config, so it stays in checkpoints."""
        self.set_teacher(source)

    def _restart_optimizers(self) -> None:
        trainer = self.attached_trainer
        if trainer is None:
            return
        # configure_optimizers() again: a new optimizer (empty state) and a new scheduler (initial LR)
        trainer.strategy.setup_optimizers(trainer)

    def generation_dir(self) -> Optional[str]:
        """Where ``generation_{k}.pt`` files go: the checkpoint directory, else the logger's run
        directory; ``None`` (no files: the generations live in memory and in checkpoints) when the
        Trainer has neither, so a bare ``Trainer(logger=False, enable_checkpointing=False)`` writes nothing."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None) if callback is not None else None
        if dirpath:
            return str(dirpath)
        if trainer.loggers:
            return str(trainer.log_dir or trainer.default_root_dir)
        return None

    def _save_generation_file(self, generation: int, module: nn.Module) -> None:
        if self.attached_trainer is None:
            return
        directory = self.generation_dir()
        if directory is None:
            return
        path = os.path.join(directory, f"generation_{generation}.pt")
        if self.trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, path)
        if path not in self.generation_paths:
            self.generation_paths.append(path)

    # ------------------------------------------------------------------ ensemble (BANE)
    def ensemble_members(self) -> list[nn.Module]:
        """Finished generations followed by the current student."""
        return [*self.generation_models, self.student]

    def ensemble_probabilities(self, inputs: Any, student_logits: Optional[Tensor] = None) -> Tensor:
        """BANE: the mean of the softmax outputs of every generation (float32, ``[N, C]``).

        ``inputs`` is a batch or a model input (each generation is called through the student's input
        routing); ``student_logits`` may be passed when already computed (saves one forward).
        """
        batch = inputs if isinstance(inputs, Batch) else Batch(inputs)

        def logits_of(model: nn.Module) -> Tensor:
            return as_outputs(self.student_routing(model, batch), "a generation").logits

        logits = logits_of(self.student) if student_logits is None else student_logits
        total = logits.detach().float().softmax(-1)
        with torch.no_grad():
            for model in self.generation_models:
                total = total + logits_of(model).float().softmax(-1)
        return total / (len(self.generation_models) + 1)

    # ------------------------------------------------------------------ losses
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.should_log_step():
            self.log("train/generation", float(self.generation), on_step=True, on_epoch=False,
                     batch_size=self.batch_size_of(unpack_batch(batch)))
        return loss

    def distillation_losses(self, student: Any, teacher: Any, batch: Batch) -> dict[str, Tensor]:
        terms = super().distillation_losses(student, teacher, batch)
        if teacher is None:  # generation 1 without a teacher: labels only
            if "tokens" in terms:  # loss_normalization="tokens": the sum over labelled tokens
                terms["loss"], terms["loss_per_token"] = terms["task_loss"] * terms["tokens"], terms["task_loss"]
            else:
                terms["loss"] = terms["task_loss"]
        return terms

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        import torchmetrics

        metrics = super().build_metrics(num_classes, with_teacher)
        for stage in metrics.values():
            stage["ensemble_acc"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")
        return metrics

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        student_logits, teacher_logits = self.eval_logits(b)
        metrics = self.eval_metrics[stage]
        if b.target is not None:
            probs = self.ensemble_probabilities(b, student_logits)
            flat = probs.reshape(-1, probs.shape[-1])
            target = b.target.reshape(-1)
            valid = target != self.ignore_index
            if bool(valid.any()):
                metrics["ensemble_acc"].update(flat[valid], target[valid])
        self.update_eval_metrics(stage, student_logits, b.target, teacher_logits)
        if stage == "val":
            self.log(f"val/gen{self.generation}_acc", metrics["acc"], on_step=False, on_epoch=True,
                     batch_size=self.batch_size_of(b))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the teacher source decides: the user's teacher stays out (unless save_teacher), a previous
        # generation (save=True) stays in as ``teacher.*``, like every finished generation
        # (``generation_models.{i}.*``)
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CKPT_KEY] = {
            "generation": self.generation,
            "finished": len(self.generation_models),
            "generations": self.generations,
            "epochs_per_generation": self._resolved_epochs,
            "seed": self.seed,
            "generation_paths": list(self.generation_paths),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            return
        if state["generations"] != self.generations:
            raise ValueError(
                f"the checkpoint was trained with generations={state['generations']}, this module has "
                f"generations={self.generations}. Build the module with the checkpoint's settings."
            )
        saved_epochs = state.get("epochs_per_generation")
        if saved_epochs is not None and self._resolved_epochs is not None and saved_epochs != self._resolved_epochs:
            raise ValueError(
                f"the checkpoint was trained with {saved_epochs} epochs per generation, this run has "
                f"{self._resolved_epochs} (trainer.max_epochs / generations). Resume with "
                f"trainer.max_epochs: {self.generations * saved_epochs}."
            )
        if saved_epochs is not None:
            self._resolved_epochs = saved_epochs
        self.rebuild_generations(int(state["finished"]))
        self.generation = int(state["generation"])
        self.seed = int(state["seed"])
        self.generation_paths = list(state.get("generation_paths", []))

    def rebuild_generations(self, finished: int) -> None:
        """Create ``finished`` frozen generation modules (to be filled by ``load_state_dict``)."""
        self.generation_models = nn.ModuleList(_frozen_copy(self.student) for _ in range(finished))
        if finished > 0:
            self._set_teacher(FrozenTeacher(self.generation_models[-1], save=True, inputs=self.student_routing))
        else:
            self._set_teacher(self._user_source[0])
        self.generation = finished + 1
