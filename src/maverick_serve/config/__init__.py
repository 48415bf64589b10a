"""Typed configuration: model specs, presets and engine settings."""

from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.model import ModelConfigError, ModelSpec, RopeScaling, TextSpec, VisionSpec
from maverick_serve.config.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "ModelConfigError",
    "ModelSpec",
    "NativeEngineConfig",
    "RopeScaling",
    "TextSpec",
    "VisionSpec",
    "preset",
]
