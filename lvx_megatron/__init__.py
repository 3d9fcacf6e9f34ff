"""lvx-megatron: context-parallel cross-attention for long-video multimodal LLMs."""

__version__ = "0.1.0"
