"""Objectives: the loss terms a :class:`~lightning_distill.DistillationModule` sums.

Each is an ``nn.Module`` with its hyperparameters and, where the method has them, its own trained parts
(projections, embedding heads, a learned temperature, a gate), built from one shape probe and restored
the same way when a checkpoint loads (:mod:`lightning_distill.objectives.base`).

=======================  =============================================================================
objective                method
=======================  =============================================================================
``CrossEntropy``         the hard-label task term
``LogitKD``              Hinton et al. 2015 (any divergence; fixed, scheduled or learned temperature)
``DKD``                  Decoupled KD, Zhao et al. 2022 (target / non-target class terms)
``FeatureMatch``         FitNets, attention transfer, RKD, SP, CKA, cosine hidden states
``CRDLoss``              contrastive representation distillation, Tian et al. 2020
``MultiTeacherKD``       several teachers mixed per sample (mean, confidence, learned gate)
``AuxiliaryHeads``       Be Your Own Teacher: exit heads on the student's own layers, Zhang et al. 2019
``TinyBERTLoss``         TinyBERT, Jiao et al. 2020 (embeddings, hidden states, attention maps; layer maps)
``MiniLMLoss``           MiniLM / MiniLMv2, Wang et al. 2020 / 2021 (self-attention distributions, relations)
``DistilBERTLoss``       DistilBERT's triple loss, Sanh et al. 2019 (MLM + soft targets + cosine)
``HiddenStateDynamics``  the layer-to-layer change of transformer hidden states
=======================  =============================================================================

Every logit objective takes ``standardize=True`` for logit standardisation (Sun et al. 2024). A module
adding a new objective exports it by listing it in its own ``__all__``; this package re-exports every
submodule's ``__all__``.
"""

from lightning_distill.objectives import (
    base,
    contrastive,
    feature,
    logit,
    multi_teacher,
    self_distillation,
    task,
    transformer,
)
from lightning_distill.objectives.base import *  # noqa: F403
from lightning_distill.objectives.contrastive import *  # noqa: F403
from lightning_distill.objectives.feature import *  # noqa: F403
from lightning_distill.objectives.logit import *  # noqa: F403
from lightning_distill.objectives.multi_teacher import *  # noqa: F403
from lightning_distill.objectives.self_distillation import *  # noqa: F403
from lightning_distill.objectives.task import *  # noqa: F403
from lightning_distill.objectives.transformer import *  # noqa: F403

__all__ = [
    name
    for module in (base, task, logit, feature, contrastive, multi_teacher, self_distillation, transformer)
    for name in module.__all__
]
