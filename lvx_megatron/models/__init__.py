"""Model components of lvx-megatron."""

from .mllama_vision import MllamaVisionEncoder, MultiModalProjector, VisionEncoderConfig

__all__ = ["MllamaVisionEncoder", "MultiModalProjector", "VisionEncoderConfig"]
