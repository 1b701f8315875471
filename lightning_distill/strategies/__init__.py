"""Distillation strategies: presets over :class:`DistillationModule` (one file each) and the multi-model modules."""

from lightning_distill.distiller import DistillationModule
from lightning_distill.strategies.born_again import BornAgain
from lightning_distill.strategies.crd import CRD
from lightning_distill.strategies.ctkd import CTKD
from lightning_distill.strategies.feature import FeatureDistillation
from lightning_distill.strategies.kd import KnowledgeDistillation
from lightning_distill.strategies.multi_teacher import MultiTeacherDistillation
from lightning_distill.strategies.mutual import MutualLearning
from lightning_distill.strategies.online import OnlineDistillation
from lightning_distill.strategies.quant_aware import QuantAwareDistillation
from lightning_distill.strategies.self_distillation import SelfDistillation

__all__ = [
    "CRD",
    "CTKD",
    "BornAgain",
    "DistillationModule",
    "FeatureDistillation",
    "KnowledgeDistillation",
    "MultiTeacherDistillation",
    "MutualLearning",
    "OnlineDistillation",
    "QuantAwareDistillation",
    "SelfDistillation",
]
