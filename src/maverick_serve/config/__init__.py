"""Typed configuration: model specs, presets and engine settings."""

from maverick_serve.config.engine import EngineConfig
from maverick_serve.config.model import ModelConfigError, ModelSpec, RopeScaling, TextSpec, VisionSpec
from maverick_serve.config.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "EngineConfig",
    "ModelConfigError",
    "ModelSpec",
    "RopeScaling",
    "TextSpec",
    "VisionSpec",
    "preset",
]
