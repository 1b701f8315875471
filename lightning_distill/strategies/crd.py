"""``CRD``: Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation"."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.features import FeatureCapture
from lightning_distill.module import Batch
from lightning_distill.strategies.kd import KnowledgeDistillation

__all__ = ["CRD"]

#: Added to the NCE denominators, as ``eps`` in RepDistiller's ``crd/criterion.py``.
_NCE_EPS = 1e-7
#: Largest float32: an estimated normalisation constant Z is clamped to it (see ``CRD``).
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _nce_loss(log_scores: Tensor, num_samples: int, eps: float = _NCE_EPS) -> Tensor:
    r"""CRD's NCE criterion (RepDistiller ``crd/criterion.py`` ``ContrastLoss``), in log space.

    ``log_scores`` is ``[B, K+1]``: the log of the normalised scores :math:`x = e^{s/\tau} / Z`
    of each anchor against the memory-bank rows ``[positive, negative_1, ..., negative_K]``
    (positive first). With the uniform noise distribution :math:`P_n = 1/\text{num\_samples}`
    and :math:`c = K P_n + \epsilon`:

    .. math::

        \log D_1 = \log \frac{x_0}{x_0 + c}, \qquad
        \log D_0^{(k)} = \log \frac{K P_n}{x_k + c}, \qquad
        \mathcal{L} = -\frac{1}{B} \sum_{i=1}^{B} \Big( \log D_1^{(i)} + \sum_{k=1}^{K} \log D_0^{(i,k)} \Big)

    (the posterior that the positive came from the data distribution and that each negative came
    from the noise distribution). Both logs are <= 0, so the loss is >= 0; it falls as the
    positive's score rises and as the negatives' scores fall. Computed from log-scores with
    ``logaddexp``, float32, so it stays finite where ``x`` would under- or overflow.

    Args:
        log_scores: ``[B, K+1]`` log of the normalised scores, positive in column 0.
        num_samples: number of rows of the memory bank (the training-set size).
        eps: added to the denominators (1e-7 as in the official code).

    Returns:
        A float32 scalar.
    """
    if log_scores.ndim != 2 or log_scores.shape[1] < 2:
        raise ValueError(f"`log_scores` must be [B, K+1] with K >= 1, got shape {tuple(log_scores.shape)}.")
    with torch.autocast(device_type=log_scores.device.type, enabled=False):
        log_x = log_scores.float()
        k = log_x.shape[1] - 1
        k_pn = k / float(num_samples)
        log_c = torch.full_like(log_x, math.log(k_pn + eps))
        log_denominator = torch.logaddexp(log_x, log_c)  # log(x + K Pn + eps)
        log_d1 = log_x[:, 0] - log_denominator[:, 0]
        log_d0 = math.log(k_pn) - log_denominator[:, 1:]
        return -(log_d1.sum() + log_d0.sum()) / log_x.shape[0]


class _Embed(nn.Module):
    """CRD's embedding head (RepDistiller ``Embed``): flatten, ``Linear(d, feat_dim)``, L2-normalise.

    The normalisation runs in float32 (also under autocast), so embeddings are unit vectors.
    """

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.reshape(x.shape[0], -1))
        with torch.autocast(device_type=y.device.type, enabled=False):
            return F.normalize(y.float(), p=2, dim=1)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool, hint: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a number in {interval} ({hint}), got {value!r}.")
    return float(value)


class CRD(KnowledgeDistillation):
    r"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, arXiv:1910.10699).

    The representations of one student layer and one teacher layer (flattened per sample) are
    mapped by trained heads ``Linear(d, feat_dim)`` + L2 normalisation to unit embeddings
    :math:`v_s, v_t`. Two memory banks, one row per training sample, hold a momentum average of
    past student (``memory_student``) and teacher (``memory_teacher``) embeddings and are
    addressed by the batch's sample ``index``. For an anchor :math:`i` with :math:`K` negative
    indices drawn uniformly from the bank, positive first (:math:`j_0 = i`):

    .. math::

        x^{t}_{ik} = \frac{\exp(\langle M_s[j_k], v_t^{(i)} \rangle / \tau)}{Z_t}, \qquad
        x^{s}_{ik} = \frac{\exp(\langle M_t[j_k], v_s^{(i)} \rangle / \tau)}{Z_s}

    and, with :math:`P_n = 1/N` (:math:`N` = ``num_samples``), the NCE loss of each side
    (:func:`_nce_loss`)

    .. math::

        \ell(x) = -\frac{1}{B}\sum_i \Big(\log\frac{x_{i0}}{x_{i0} + K P_n + \epsilon}
                  + \sum_{k=1}^{K} \log\frac{K P_n}{x_{ik} + K P_n + \epsilon}\Big),

    .. math::

        \mathcal{L} = (1-\alpha)\,\mathrm{CE}(z_S, y) + \alpha\,T^2\,\mathrm{KL}
                      + \beta\,\big(\ell(x^t) + \ell(x^s)\big).

    This follows the official code (RepDistiller ``crd/memory.py`` ``ContrastMemory`` and
    ``crd/criterion.py`` ``ContrastLoss``): banks initialised uniformly in
    :math:`[-\sigma, \sigma]`, :math:`\sigma = 1/\sqrt{\text{feat\_dim}/3}`; the normalisation
    constants :math:`Z = \mathrm{mean}(e^{s/\tau}) \cdot N` are estimated once, on the first
    training batch, and then kept fixed (buffers ``z_student`` / ``z_teacher``, -1 until
    estimated); after the loss, the batch's rows are updated under ``no_grad``:
    :math:`M[i] \leftarrow \mathrm{normalize}(m\,M[i] + (1-m)\,v^{(i)})` (student embeddings into
    ``memory_student``, teacher embeddings into ``memory_teacher``). The student learns through
    :math:`x^s` (its embedding against the teacher bank), the teacher head through :math:`x^t`;
    the teacher backbone stays frozen. Negatives are drawn with ``torch.randint`` from a
    device-local generator (seeded from ``torch.initial_seed()``, its state is checkpointed), so
    the global RNG stream is untouched; a negative equal to the anchor is allowed, as with the
    official code's uniform ``AliasMethod``. (RepDistiller's CIFAR-100 runs additionally pass
    class-aware negatives from ``CIFAR100InstanceSample``; this version samples uniformly.)

    Scores are computed in float32 even under autocast, and in log space: :math:`Z` comes from a
    ``logsumexp``. They are bounded -- embeddings are unit vectors, bank rows are unit vectors
    after their first update (norm at most :math:`\sqrt 3` before), and :math:`\tau` is fixed --
    so :math:`|s/\tau| \le \sqrt3/\tau`; :math:`Z \le N e^{\sqrt3/\tau}` is finite in float32
    for any :math:`\tau \ge 0.03` and :math:`N < 10^9` (an estimate beyond float32's range would
    be clamped to its largest value).

    Needs batches ``(input, target, index)`` with ``index`` the sample's position in the
    training set (``DigitsDataModule``, ``CIFARDataModule``, or any dataset wrapped in
    ``IndexedDataset``). Both banks, both :math:`Z`, the heads and the sampler state are in the
    checkpoint; ``CRD.load_from_checkpoint(path, student=..., teacher=...)`` works before
    ``setup`` (the heads are rebuilt from a zeros probe of the saved input shape, the banks from
    the saved ``num_samples``).

    Under DDP each rank updates only the rows of its own batches; there is no cross-rank
    synchronisation of the banks in this version. Note that DDP's default
    ``broadcast_buffers=True`` re-sends rank 0's buffers -- the banks included -- at every
    forward, so then only rank 0's updates persist; ``DDPStrategy(broadcast_buffers=False)``
    keeps per-rank banks instead.

    Args:
        student, teacher: the networks (the teacher is frozen; see :class:`DistillationModule`).
        student_layer, teacher_layer: module names (as in ``named_modules()``) whose outputs,
            flattened per sample, are the representations, e.g. ``block2`` of
            ``DigitsStudentCNN`` ([N, 8]) and ``block3`` of ``DigitsCNN`` ([N, 64]).
        feat_dim: embedding size of both heads.
        num_negatives: K, negatives drawn per anchor from the bank (independent of the dataset
            size; must be smaller than ``num_samples - 1``, checked at setup).
        nce_temperature: :math:`\tau > 0` of the scores.
        nce_momentum: :math:`m \in [0, 1)` of the memory update.
        crd_weight: :math:`\beta \ge 0`, the weight of the CRD term.
        num_samples: rows of each bank = training-set size; ``None`` takes
            ``len(trainer.datamodule.train_dataset)`` in ``setup``.
        temperature, alpha, kl: the logit KD term, as in :class:`KnowledgeDistillation`. The
            defaults give RepDistiller's CIFAR-100 setting: CE weight 1, KD weight 0
            (``alpha=0``), CRD weight 0.8.
        **kwargs: ``teacher_checkpoint``, ``optimizer``, ``lr_scheduler``, ... of
            :class:`DistillationModule`.

    Example::

        >>> import torch
        >>> from lightning_distill.strategies.crd import CRD
        >>> from lightning_distill.models import DigitsCNN, DigitsStudentCNN
        >>> module = CRD(DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...              student_layer="block2", teacher_layer="block3", feat_dim=64, num_negatives=512)
        >>> module.build(torch.zeros(2, 1, 8, 8))  # what setup() does with a real input
        >>> module.embed_student.linear, module.embed_teacher.linear
        (Linear(in_features=8, out_features=64, bias=True), Linear(in_features=64, out_features=64, bias=True))
        >>> module.memory_student is None  # allocated in setup() from the training-set size
        True
        >>> module.z_student.item()  # estimated on the first training batch
        -1.0
    """

    supports_teacher_cache = False  # its memory banks are updated from live teacher embeddings of its own capture

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str,
        teacher_layer: str,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        nce_temperature: float = 0.07,
        nce_momentum: float = 0.5,
        crd_weight: float = 0.8,
        num_samples: Optional[int] = None,
        temperature: float = 4.0,
        alpha: float = 0.0,
        kl: str = "forward",
        **kwargs: Any,
    ) -> None:
        feat_dim = _check_int("feat_dim", feat_dim, 1)
        num_negatives = _check_int("num_negatives", num_negatives, 1)
        nce_temperature = _check_float(
            "nce_temperature", nce_temperature, 0.0, math.inf, True, True, "the temperature of the contrastive scores; 0.07 in the paper"
        )
        nce_momentum = _check_float(
            "nce_momentum", nce_momentum, 0.0, 1.0, False, True, "momentum of the memory-bank update; 0.5 in the paper"
        )
        crd_weight = _check_float("crd_weight", crd_weight, 0.0, math.inf, False, True, "beta, the weight of the CRD term")
        if num_samples is not None:
            num_samples = _check_int("num_samples", num_samples, 2)
            self._check_num_negatives(num_negatives, num_samples)
        if teacher is None:
            raise ValueError("CRD needs a `teacher` module.")
        if not isinstance(student_layer, str) or not isinstance(teacher_layer, str):
            raise ValueError(
                f"`student_layer` and `teacher_layer` must be module names (str), got {student_layer!r} and {teacher_layer!r}."
            )
        # layer names are checked before the teacher's weights are loaded
        student_capture = FeatureCapture(student, [student_layer], None, "the student", "student_layer")
        teacher_capture = FeatureCapture(teacher, [teacher_layer], None, "the teacher", "teacher_layer")
        super().__init__(student, teacher, temperature=temperature, alpha=alpha, kl=kl, **kwargs)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.nce_temperature = nce_temperature
        self.nce_momentum = nce_momentum
        self.crd_weight = crd_weight
        self.num_samples = num_samples
        self._student_capture = student_capture
        self._teacher_capture = teacher_capture
        # heads: built from probed shapes in on_probe (setup) or on_load_checkpoint
        self.embed_student: Optional[_Embed] = None
        self.embed_teacher: Optional[_Embed] = None
        # memory banks [num_samples, feat_dim]: allocated in setup or on_load_checkpoint
        self.register_buffer("memory_student", None)
        self.register_buffer("memory_teacher", None)
        # normalisation constants Z of the student-anchor / teacher-anchor scores; -1: not estimated yet
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._features: Optional[tuple[Tensor, Tensor]] = None
        self._probe_input_shape: Optional[tuple[int, ...]] = None
        self._generator: Optional[torch.Generator] = None
        self._pending_generator_state: Optional[tuple[str, Tensor]] = None
        self._index_checked = False

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_num_negatives(num_negatives: int, num_samples: int) -> None:
        if num_negatives >= num_samples - 1:
            raise ValueError(
                f"`num_negatives`={num_negatives} is too large for a memory bank of {num_samples} rows (the "
                f"training-set size): it must be smaller than num_samples - 1 = {num_samples - 1}. Lower "
                f"num_negatives (e.g. {max(1, min(4096, num_samples // 2))})."
            )

    # ------------------------------------------------------------------ building from a probe
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        with self._teacher_capture:
            teacher_out = self.call_teacher(self.teacher, example)
        with self._student_capture:
            student_out = self.student(example)
        self._features = (self._student_capture.pop()[self.student_layer], self._teacher_capture.pop()[self.teacher_layer])
        return student_out, teacher_out

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        num_classes = super().on_probe(example, output, teacher_output)
        if isinstance(example, Tensor):
            self._probe_input_shape = tuple(example.shape)
        f_s, f_t = self._features
        self._features = None
        if self.embed_student is None:
            self.embed_student = _Embed(f_s[0].numel(), self.feat_dim)
            self.embed_teacher = _Embed(f_t[0].numel(), self.feat_dim)
        return num_classes

    def build(self, example_input: Any) -> None:
        """Probe on ``example_input`` now and create the embedding heads (for use before ``load_state_dict``)."""
        self.on_probe(example_input, *self.probe(example_input))

    def _allocate_memory(self, num_samples: int) -> None:
        """Both banks, ``[num_samples, feat_dim]``, uniform in [-stdv, stdv], stdv = 1/sqrt(feat_dim/3)."""
        self._check_num_negatives(self.num_negatives, num_samples)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        device = self.z_student.device
        self.memory_student = torch.rand(num_samples, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.memory_teacher = torch.rand(num_samples, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.num_samples = num_samples

    def _train_set_size(self) -> Optional[int]:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        dataset = getattr(dm, "train_dataset", None)
        if dataset is None:
            return None
        try:
            return len(dataset)
        except TypeError:
            return None

    def setup(self, stage: str) -> None:
        """Build the heads from a probe (``on_probe``) and, for ``fit``, allocate the memory banks.

        Raises a ValueError before any step when the training-set size cannot be found or
        ``num_negatives`` does not fit in it.
        """
        super().setup(stage)
        if self.embed_student is None:
            raise ValueError(
                "CRD could not probe the models to build its embedding heads: set `example_input_array` "
                "or use a datamodule with `example_input()` / a train dataloader."
            )
        if stage != "fit":
            return
        found = self._train_set_size()
        if self.memory_student is not None:
            rows = self.memory_student.shape[0]
            if found is not None and found != rows:
                raise ValueError(
                    f"CRD's memory banks have {rows} rows but the training set has {found} samples; "
                    "the banks need one row per training sample (num_samples)."
                )
            return
        if self.num_samples is not None:
            if found is not None and found != self.num_samples:
                raise ValueError(
                    f"`num_samples`={self.num_samples} but the training set has {found} samples; the memory banks "
                    "need one row per training sample: pass num_samples=None to take the training-set size."
                )
            self._allocate_memory(self.num_samples)
            return
        if found is None:
            raise ValueError(
                "CRD needs the training-set size for its memory banks (one row per sample) and could not find "
                "`trainer.datamodule.train_dataset`: pass `num_samples` (the number of training samples)."
            )
        self._allocate_memory(found)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["crd_probe_input_shape"] = list(self._probe_input_shape) if self._probe_input_shape else None
        checkpoint["crd_num_samples"] = int(self.memory_student.shape[0]) if self.memory_student is not None else None
        gen = self._generator
        checkpoint["crd_generator_state"] = (gen.device.type, gen.get_state()) if gen is not None else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        shape = checkpoint.get("crd_probe_input_shape")
        if self.embed_student is None and shape:
            self.build(torch.zeros(shape))  # rebuild the heads so their weights can load
        num_samples = checkpoint.get("crd_num_samples")
        if num_samples and self.memory_student is None:
            self._allocate_memory(int(num_samples))  # values come from the state dict
        state = checkpoint.get("crd_generator_state")
        if state is not None:
            device_type, gen_state = state
            if self._generator is not None and self._generator.device.type == device_type:
                self._generator.set_state(gen_state)
            else:
                self._generator = None
                self._pending_generator_state = (device_type, gen_state)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        super().on_train_start()
        self._index_checked = False

    def forward_models(self, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        with self._teacher_capture:
            teacher_logits = self.teacher_forward(inputs)
        with self._student_capture:
            student_logits = self.student(inputs)
        self._features = (self._student_capture.pop()[self.student_layer], self._teacher_capture.pop()[self.teacher_layer])
        return student_logits, teacher_logits

    def _negative_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device=device)
            pending = self._pending_generator_state
            if pending is not None and pending[0] == device.type:
                gen.set_state(pending[1])
            else:
                gen.manual_seed((torch.initial_seed() + 1_000_003) % 2**63)
            self._pending_generator_state = None
            self._generator = gen
        return gen

    def _check_index(self, index: Tensor) -> None:
        if self._index_checked:
            return
        n = self.memory_student.shape[0]
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            raise ValueError(
                f"batch sample indices must lie in [0, {n}) (one memory-bank row per training sample), got "
                f"[{lo}, {hi}]; the index must be the sample's position in the training set."
            )
        self._index_checked = True

    def crd_loss(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> Tensor:
        """The CRD term ``loss_t + loss_s`` for features ``f_s`` / ``f_t`` of samples ``index``; updates the banks."""
        if self.memory_student is None or self.embed_student is None:
            raise RuntimeError(
                "CRD's heads / memory banks do not exist yet: they are created in setup() (trainer.fit) "
                "or by loading a checkpoint."
            )
        index = index.reshape(-1).long().to(self.memory_student.device)
        self._check_index(index)
        v_s = self.embed_student(f_s)
        v_t = self.embed_teacher(f_t.detach())
        n, k = self.memory_student.shape[0], self.num_negatives
        batch = index.shape[0]
        negatives = torch.randint(
            0, n, (batch, k), generator=self._negative_generator(index.device), device=index.device
        )
        idx = torch.cat([index.unsqueeze(1), negatives], dim=1)  # positive first
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            rows_s = self.memory_student.index_select(0, idx.reshape(-1)).detach().float().view(batch, k + 1, -1)
            rows_t = self.memory_teacher.index_select(0, idx.reshape(-1)).detach().float().view(batch, k + 1, -1)
            scores_t = torch.bmm(rows_s, v_t.float().unsqueeze(2)).squeeze(2) / self.nce_temperature
            scores_s = torch.bmm(rows_t, v_s.float().unsqueeze(2)).squeeze(2) / self.nce_temperature
            log_z_s = self._log_z(self.z_student, scores_s, n)
            log_z_t = self._log_z(self.z_teacher, scores_t, n)
            loss_s = _nce_loss(scores_s - log_z_s, n)
            loss_t = _nce_loss(scores_t - log_z_t, n)
            self._update_memory(index, v_s, v_t)
        return loss_t + loss_s

    @staticmethod
    def _log_z(buffer: Tensor, scores: Tensor, num_samples: int) -> Tensor:
        """log Z, estimating Z = mean(exp(scores)) * num_samples into ``buffer`` if not set (no host sync)."""
        with torch.no_grad():
            log_estimate = torch.logsumexp(scores.detach().reshape(-1), 0) - math.log(scores.numel()) + math.log(num_samples)
            estimate = log_estimate.exp().clamp(max=_FLOAT32_MAX)
            z = torch.where(buffer > 0, buffer, estimate.to(buffer.dtype))
            buffer.copy_(z)
            return z.float().log()

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """``row <- normalize(m * row + (1 - m) * v)`` for the batch's rows of both banks."""
        m = self.nce_momentum
        for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = bank.index_select(0, index).float().mul_(m).add_(v.detach().float(), alpha=1.0 - m)
            bank.index_copy_(0, index, F.normalize(rows, p=2, dim=1).to(bank.dtype))

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        if batch.index is None:
            raise ValueError(
                "CRD needs each sample's index to address its memory banks: use a dataset returning "
                "(input, target, index) -- DigitsDataModule, CIFARDataModule, or wrap yours in "
                "lightning_distill.data.IndexedDataset."
            )
        if self._features is None:
            raise RuntimeError("CRD.distillation_losses needs forward_models() to run first.")
        f_s, f_t = self._features
        self._features = None
        index = torch.as_tensor(batch.index)
        crd = self.crd_loss(f_s, f_t, index)
        terms = super().distillation_losses(student_logits, teacher_logits, batch)
        terms["loss"] = terms["loss"] + self.crd_weight * crd
        terms["crd_loss"] = crd
        return terms
