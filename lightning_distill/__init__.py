"""lightning_distill: knowledge distillation strategies as PyTorch Lightning modules.

Every strategy is a :class:`DistillationModule` (:mod:`lightning_distill.distiller`): a student, a teacher
source (:mod:`lightning_distill.teachers`, which carries the frozen-teacher contract) and weighted
objectives (:mod:`lightning_distill.objectives`); :class:`Classifier` trains teachers and no-KD baselines.
Run them from YAML with ``lightning-distill fit --config configs/...``.
"""

from lightning_distill.classifier import Classifier
from lightning_distill.strategies import (
    CRD,
    CTKD,
    BornAgain,
    DistillationModule,
    FeatureDistillation,
    KnowledgeDistillation,
    MultiTeacherDistillation,
    MutualLearning,
    OnlineDistillation,
    QuantAwareDistillation,
    SelfDistillation,
)

__version__ = "0.1.0"

__all__ = [
    "CRD",
    "CTKD",
    "BornAgain",
    "Classifier",
    "DistillationModule",
    "FeatureDistillation",
    "KnowledgeDistillation",
    "MultiTeacherDistillation",
    "QuantAwareDistillation",
    "MutualLearning",
    "OnlineDistillation",
    "SelfDistillation",
    "__version__",
]
