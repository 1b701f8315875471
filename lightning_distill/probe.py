"""Shape probing: run the models once on a small real batch before training, and remember how.

Parts of an objective whose sizes depend on the models -- projections between feature widths, CRD's
embedding heads, an instance-wise temperature MLP, a multi-teacher gate, self-distillation's exit
heads -- are built from one :class:`Probe`: the outputs (and captured features) of the student and
the teacher on a few samples, in eval mode under ``torch.no_grad()``, plus the training-set size.

Where the probe batch comes from, in order: the module's ``example_input_array``; the datamodule's
``example_input()``; the first batch of the datamodule's training loader; and -- for dataloaders
passed straight to ``trainer.fit`` -- the first training (or sanity-check validation) batch, after
which the optimizer is rebuilt so that it holds the new parts.

A checkpoint stores the probe's *input spec* (shapes and dtypes of a two-sample batch, see
:func:`batch_spec`) and the training-set size; loading it re-runs the probe on zeros of that spec
(:func:`batch_from_spec`), so every part is rebuilt the same way it was first built, before its
weights load.

Example::

    >>> import torch
    >>> from lightning_distill.batch import Batch
    >>> from lightning_distill.probe import batch_from_spec, batch_spec
    >>> spec = batch_spec(Batch(torch.ones(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)))
    >>> spec["input"]
    {'shape': [2, 1, 8, 8], 'dtype': 'float32'}
    >>> batch_from_spec(spec).input.shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch, clip_batch
from lightning_distill.outputs import ModelOutputs

__all__ = ["PROBE_SAMPLES", "Probe", "batch_from_spec", "batch_spec"]

#: how many samples a probe runs on (BatchNorm in eval mode works with any number)
PROBE_SAMPLES = 2


@dataclass
class Probe:
    """What one probe forward saw.

    Attributes:
        batch: the (clipped) batch the models ran on.
        student: the student's outputs, with every requested student layer in ``features``.
        teacher: the teacher's outputs (``None`` without a teacher), with the requested teacher layers.
        num_samples: the training-set size when known (per-sample state such as a memory bank needs it).
        student_model: the student network itself (for objectives that inspect its structure).
        routing: how the module calls the student (:mod:`lightning_distill.batch`).
        stage: the Trainer stage the probe serves (``"fit"``, ``"validate"``, ...; ``"load"`` when a
            checkpoint is loaded, ``"build"`` for ``module.build(example)``): per-sample training state is
            only required for ``"fit"``.
    """

    batch: Batch
    student: ModelOutputs
    teacher: Optional[ModelOutputs]
    num_samples: Optional[int] = None
    student_model: Optional[nn.Module] = None
    stage: str = "fit"
    routing: Optional[Any] = None

    def call_student(self) -> Any:
        """The student's raw output on the probe batch, through the module's input routing."""
        if self.routing is not None:
            return self.routing(self.student_model, self.batch)
        return self.student_model(self.batch.input)

    @property
    def num_classes(self) -> int:
        """Classes (or vocabulary size) of the student's logits."""
        return int(self.student.logits.shape[-1])


def _tensor_spec(t: Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def _spec(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _tensor_spec(value)
    if isinstance(value, dict):
        return {"dict": {k: _spec(v) for k, v in value.items()}}
    return None


def batch_spec(batch: Batch) -> dict[str, Any]:
    """Shapes and dtypes of a probe batch's model inputs, clipped to :data:`PROBE_SAMPLES` samples."""
    b = clip_batch(batch, PROBE_SAMPLES)
    return {"input": _spec(b.input), "mask": _spec(b.mask), "inputs": _spec(b.inputs)}


def _zeros(spec: Any) -> Any:
    if spec is None:
        return None
    if "dict" in spec:
        return {k: _zeros(v) for k, v in spec["dict"].items()}
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))


def batch_from_spec(spec: dict[str, Any]) -> Batch:
    """A batch of zeros with the shapes and dtypes of :func:`batch_spec`."""
    mask = _zeros(spec.get("mask"))
    if mask is not None:
        mask = torch.ones_like(mask)  # every position valid
    inputs = _zeros(spec.get("inputs"))
    if inputs is not None:  # attention masks: every position valid
        inputs = {k: torch.ones_like(v) if "mask" in k and isinstance(v, Tensor) else v for k, v in inputs.items()}
    return Batch(_zeros(spec["input"]), mask=mask, inputs=inputs)
