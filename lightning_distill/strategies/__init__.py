"""Distillation strategies: one LightningModule per file, all built on :class:`DistillationModule`."""

from lightning_distill.strategies.base import DistillationModule
from lightning_distill.strategies.crd import CRD
from lightning_distill.strategies.ctkd import CTKD
from lightning_distill.strategies.feature import FeatureDistillation
from lightning_distill.strategies.kd import KnowledgeDistillation
from lightning_distill.strategies.self_distillation import SelfDistillation

__all__ = ["CRD", "CTKD", "DistillationModule", "FeatureDistillation", "KnowledgeDistillation", "SelfDistillation"]
