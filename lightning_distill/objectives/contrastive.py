r"""``CRDLoss``: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, arXiv:1910.10699).

The representations of one student layer and one teacher layer (flattened per sample) are mapped by
trained heads ``Linear(d, feat_dim)`` + L2 normalisation to unit embeddings :math:`v_s, v_t`. Two
memory banks, one row per training sample, hold a momentum average of past student
(``memory_student``) and teacher (``memory_teacher``) embeddings and are addressed by the batch's
sample ``index``. For an anchor :math:`i` with :math:`K` negative indices drawn uniformly from the bank,
positive first (:math:`j_0 = i`):

.. math::

    x^{t}_{ik} = \frac{\exp(\langle M_s[j_k], v_t^{(i)} \rangle / \tau)}{Z_t}, \qquad
    x^{s}_{ik} = \frac{\exp(\langle M_t[j_k], v_s^{(i)} \rangle / \tau)}{Z_s}

and, with :math:`P_n = 1/N` (:math:`N` = ``num_samples``), the NCE loss of each side (:func:`_nce_loss`)

.. math::

    \ell(x) = -\frac{1}{B}\sum_i \Big(\log\frac{x_{i0}}{x_{i0} + K P_n + \epsilon}
              + \sum_{k=1}^{K} \log\frac{K P_n}{x_{ik} + K P_n + \epsilon}\Big), \qquad
    \mathcal{L}_{CRD} = w\,\big(\ell(x^t) + \ell(x^s)\big).

This follows the official code (RepDistiller ``crd/memory.py`` ``ContrastMemory`` and
``crd/criterion.py`` ``ContrastLoss``): banks initialised uniformly in :math:`[-\sigma, \sigma]`,
:math:`\sigma = 1/\sqrt{\text{feat\_dim}/3}`; the normalisation constants
:math:`Z = \mathrm{mean}(e^{s/\tau}) \cdot N` are estimated once, on the first training batch, and then
kept fixed (buffers ``z_student`` / ``z_teacher``, -1 until estimated); after the loss, the batch's rows
are updated under ``no_grad``: :math:`M[i] \leftarrow \mathrm{normalize}(m\,M[i] + (1-m)\,v^{(i)})`. The
student learns through :math:`x^s` (its embedding against the teacher bank), the teacher head through
:math:`x^t`; the teacher backbone stays frozen. Negatives are drawn with ``torch.randint`` from a
device-local generator (seeded from ``torch.initial_seed()``, its state is checkpointed), so the global
RNG stream is untouched; a negative equal to the anchor is allowed, as with the official code's uniform
``AliasMethod``. (RepDistiller's CIFAR-100 runs additionally pass class-aware negatives; this version
samples uniformly.)

Scores are computed in float32 even under autocast, and in log space: :math:`Z` comes from a
``logsumexp``. They are bounded -- embeddings are unit vectors, bank rows are unit vectors after their
first update (norm at most :math:`\sqrt 3` before), and :math:`\tau` is fixed -- so
:math:`|s/\tau| \le \sqrt3/\tau`; :math:`Z \le N e^{\sqrt3/\tau}` is finite in float32 for any
:math:`\tau \ge 0.03` and :math:`N < 10^9`.

Needs batches ``(input, target, index)`` with ``index`` the sample's position in the training set
(``DigitsDataModule``, ``CIFARDataModule``, or any dataset wrapped in ``IndexedDataset``): plain
``(x, y)`` batches are refused with that advice before the first step. Under DDP each rank updates only
the rows of its own batches; DDP's default ``broadcast_buffers=True`` re-sends rank 0's buffers -- the
banks included -- at every forward, so then only rank 0's updates persist;
``DDPStrategy(broadcast_buffers=False)`` keeps per-rank banks instead.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.batch import Batch, require_index
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_float, check_int

__all__ = ["CRDLoss"]

#: Added to the NCE denominators, as ``eps`` in RepDistiller's ``crd/criterion.py``.
_NCE_EPS = 1e-7
#: Largest float32: an estimated normalisation constant Z is clamped to it.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _nce_loss(log_scores: Tensor, num_samples: int, eps: float = _NCE_EPS) -> Tensor:
    r"""CRD's NCE criterion (RepDistiller ``crd/criterion.py`` ``ContrastLoss``), in log space.

    ``log_scores`` is ``[B, K+1]``: the log of the normalised scores :math:`x = e^{s/\tau} / Z` of each
    anchor against the memory-bank rows ``[positive, negative_1, ..., negative_K]`` (positive first). With
    the uniform noise distribution :math:`P_n = 1/\text{num\_samples}` and :math:`c = K P_n + \epsilon`:
    :math:`\log D_1 = \log \frac{x_0}{x_0 + c}`, :math:`\log D_0^{(k)} = \log \frac{K P_n}{x_k + c}`,
    :math:`\mathcal{L} = -\frac{1}{B} \sum_i ( \log D_1^{(i)} + \sum_k \log D_0^{(i,k)} )` -- the
    posterior that the positive came from the data and each negative from the noise. Both logs are
    <= 0, so the loss is >= 0. Computed with ``logaddexp`` in float32, finite where ``x`` would under- or
    overflow. Returns a float32 scalar.
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
    """CRD's embedding head (RepDistiller ``Embed``): flatten, ``Linear(d, feat_dim)``, L2-normalise (float32)."""

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.reshape(x.shape[0], -1))
        with torch.autocast(device_type=y.device.type, enabled=False):
            return F.normalize(y.float(), p=2, dim=1)


def check_num_negatives(num_negatives: int, num_samples: int) -> None:
    if num_negatives >= num_samples - 1:
        raise ValueError(
            f"`num_negatives`={num_negatives} is too large for a memory bank of {num_samples} rows (the "
            f"training-set size): it must be smaller than num_samples - 1 = {num_samples - 1}. Lower "
            f"num_negatives (e.g. {max(1, min(4096, num_samples // 2))})."
        )


class CRDLoss(Objective):
    """The CRD term (see the module docstring); logged as ``train/crd_loss``.

    Args:
        student_layer, teacher_layer: module names (as in ``named_modules()``) whose outputs, flattened
            per sample, are the representations.
        feat_dim: embedding size of both heads.
        num_negatives: K, negatives drawn per anchor (smaller than ``num_samples - 1``).
        nce_temperature: :math:`\\tau > 0` of the scores (paper: 0.07).
        nce_momentum: :math:`m \\in [0, 1)` of the memory update (paper: 0.5).
        weight: :math:`\\beta \\ge 0`, the weight of the term (RepDistiller: 0.8).
        num_samples: rows of each bank = training-set size; ``None`` takes it from the training data
            when the probe runs.
    """

    name = "crd"

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        nce_temperature: float = 0.07,
        nce_momentum: float = 0.5,
        weight: float = 0.8,
        num_samples: Optional[int] = None,
    ) -> None:
        feat_dim = check_int("feat_dim", feat_dim, minimum=1)
        num_negatives = check_int("num_negatives", num_negatives, minimum=1)
        nce_temperature = check_float(
            "nce_temperature", nce_temperature, 0.0, math.inf, low_open=True, high_open=True,
            what="a number in (0.0, inf) (the temperature of the contrastive scores; 0.07 in the paper)",
        )
        nce_momentum = check_float(
            "nce_momentum", nce_momentum, 0.0, 1.0, high_open=True,
            what="a number in [0.0, 1.0) (momentum of the memory-bank update; 0.5 in the paper)",
        )
        weight = check_float(
            "crd_weight", weight, 0.0, math.inf, high_open=True, what="a number in [0.0, inf) (beta, the weight of the CRD term)"
        )
        if num_samples is not None:
            num_samples = check_int("num_samples", num_samples, minimum=2)
            check_num_negatives(num_negatives, num_samples)
        if not isinstance(student_layer, str) or not isinstance(teacher_layer, str):
            raise ValueError(
                f"`student_layer` and `teacher_layer` must be module names (str), got {student_layer!r} and {teacher_layer!r}."
            )
        super().__init__(weight)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.student_layer_argument, self.teacher_layer_argument = "student_layer", "teacher_layer"
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.nce_temperature = nce_temperature
        self.nce_momentum = nce_momentum
        self.num_samples = num_samples
        self.embed_student: Optional[_Embed] = None
        self.embed_teacher: Optional[_Embed] = None
        self.register_buffer("memory_student", None)
        self.register_buffer("memory_teacher", None)
        # normalisation constants Z of the student-anchor / teacher-anchor scores; -1: not estimated yet
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._generator: Optional[torch.Generator] = None
        self._pending_generator_state: Optional[tuple[str, Tensor]] = None
        self._index_checked = False

    def student_layers(self) -> dict[str, int]:
        return {self.student_layer: 0}

    def teacher_layers(self) -> dict[str, int]:
        return {self.teacher_layer: 0}

    # ------------------------------------------------------------------ building
    @property
    def needs_probe(self) -> bool:
        return self.embed_student is None

    def build(self, probe: Probe) -> None:
        """The heads from the probed feature sizes; for training, the banks from the training-set size."""
        if probe.teacher is None:
            raise ValueError("CRD contrasts student and teacher representations and needs a teacher.")
        if self.embed_student is None:
            f_s, f_t = probe.student.features[self.student_layer], probe.teacher.features[self.teacher_layer]
            device = self.z_student.device
            self.embed_student = _Embed(f_s[0].numel(), self.feat_dim).to(device).train(self.training)
            self.embed_teacher = _Embed(f_t[0].numel(), self.feat_dim).to(device).train(self.training)
        found = probe.num_samples
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
        elif found is not None:
            self._allocate_memory(found)
        # otherwise the banks wait for the training DataLoader (on_train_start)

    def _allocate_memory(self, num_samples: int) -> None:
        """Both banks, ``[num_samples, feat_dim]``, uniform in [-stdv, stdv], stdv = 1/sqrt(feat_dim/3)."""
        check_num_negatives(self.num_negatives, num_samples)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        device = self.z_student.device
        self.memory_student = torch.rand(num_samples, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.memory_teacher = torch.rand(num_samples, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.num_samples = num_samples

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        gen = self._generator
        rows = int(self.memory_student.shape[0]) if self.memory_student is not None else None
        return {"generator": (gen.device.type, gen.get_state()) if gen is not None else None, "num_samples": rows}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("num_samples") and self.memory_student is None:
            self._allocate_memory(int(state["num_samples"]))  # the values come with the state dict
        found = state.get("generator")
        if found is None:
            return
        device_type, gen_state = found
        if self._generator is not None and self._generator.device.type == device_type:
            self._generator.set_state(gen_state)
        else:
            self._generator = None
            self._pending_generator_state = (device_type, gen_state)

    def on_train_start(self, module: Any) -> None:
        self._index_checked = False
        if self.memory_student is None:
            found = module.training_set_size()
            if found is None:
                raise ValueError(
                    "CRD needs the training-set size for its memory banks (one row per sample) and could not find "
                    "it (no `trainer.datamodule.train_dataset`, and the training DataLoader's dataset has no length): "
                    "pass `num_samples` (the number of training samples)."
                )
            self._allocate_memory(found)

    def check_batch(self, batch: Batch) -> None:
        require_index(batch, "CRD needs each sample's index to address its memory banks")

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

    # ------------------------------------------------------------------ the term
    def contrast(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> Tensor:
        """``loss_t + loss_s`` for features ``f_s`` / ``f_t`` of samples ``index``; updates the banks."""
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
        negatives = torch.randint(0, n, (batch, k), generator=self._negative_generator(index.device), device=index.device)
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

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        index = require_index(batch, "CRD needs each sample's index to address its memory banks")
        if teacher is None or self.student_layer not in student.features or self.teacher_layer not in teacher.features:
            raise RuntimeError("CRD needs the captured features of its layers: pass the outputs of forward_models().")
        value = self.contrast(student.features[self.student_layer], teacher.features[self.teacher_layer], index)
        return self.terms(value)
