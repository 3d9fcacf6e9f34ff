"""Generation: ask a trained model about a clip, with the visual K/V sharded over the CP group.

:func:`generate` continues a batch of prompts with megatron's KV cache for the text and each CP
rank's cached visual K/V (:mod:`.decoder`); :func:`build_prompts` makes the prompts as the training
data does; :func:`load_for_generation` loads a ``pretrain_mllm.py`` checkpoint of any family.
``docs/generation.md`` describes the design.
"""

from .decoder import CachedDecoder
from .loading import GenerationModel, load_for_generation
from .loop import generate
from .prompt import PromptBatch, answer_text, build_prompts
from .sampling import Sampling

__all__ = [
    "CachedDecoder",
    "GenerationModel",
    "PromptBatch",
    "Sampling",
    "answer_text",
    "build_prompts",
    "generate",
    "load_for_generation",
]
