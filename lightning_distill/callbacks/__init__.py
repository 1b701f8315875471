"""Callbacks, one per file."""

from lightning_distill.callbacks.curriculum import ProgressiveCurriculum
from lightning_distill.callbacks.temperature import TemperatureMonitor

__all__ = ["ProgressiveCurriculum", "TemperatureMonitor"]
