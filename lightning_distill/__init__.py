"""lightning_distill: knowledge distillation strategies as PyTorch Lightning modules.

Every strategy is a :class:`DistillationModule` that wraps a frozen teacher (see the teacher
contract in :mod:`lightning_distill.strategies.base`); :class:`Classifier` trains teachers and
no-KD baselines. Run them from YAML with ``lightning-distill fit --config configs/...``.
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
