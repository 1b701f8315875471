"""Callbacks, one per file."""

from lightning_distill.callbacks.channels_last import ChannelsLast
from lightning_distill.callbacks.compile import CompileModels
from lightning_distill.callbacks.curriculum import ProgressiveCurriculum
from lightning_distill.callbacks.temperature import TemperatureMonitor

__all__ = ["ChannelsLast", "CompileModels", "ProgressiveCurriculum", "TemperatureMonitor"]
