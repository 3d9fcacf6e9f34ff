"""What the cross-attention layers keep during KV-cached generation, on megatron's inference context.

megatron's ``StaticInferenceContext`` holds the text self-attention's KV cache
(``key_value_memory_dict``, filled by ``SelfAttention`` itself). The cross-attention layers add
their visual keys/values: each CP rank's layer projects its own visual shard ``X`` once, at
prefill, and every later step attends the new text rows to that cached shard. They are stored on
the context object, keyed by the layer number, so one generation's state lives and ends with its
context.
"""

from collections.abc import Callable

from megatron.core.inference.contexts import BaseInferenceContext, StaticInferenceContext
from torch import Tensor


class CrossAttentionInferenceContext(StaticInferenceContext):
    """megatron's static-batching inference context plus the cross-attention layers' visual K/V.

    Attributes:
        visual_key_value_dict: layer number -> ``(k, v)`` ``[B, S_vis_local, groups_per_rank, d]``,
            this CP rank's visual shard projected by that layer at prefill.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        super().__init__(max_batch_size, max_sequence_length)
        self.visual_key_value_dict: dict[int, tuple[Tensor, Tensor]] = {}

    def reset(self) -> None:
        """Ready for a new batch: a new batch has new images, so the visual K/V go too."""
        super().reset()
        self.visual_key_value_dict.clear()


def cached_visual_key_value(
    inference_context: BaseInferenceContext,
    layer_number: int,
    context: Tensor | None,
    project_kv: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Layer ``layer_number``'s visual ``(k, v)``: ``project_kv(context)`` at prefill (the context's
    ``sequence_len_offset`` is 0), stored on the context; read back at every later step."""
    store = getattr(inference_context, "visual_key_value_dict", None)
    if store is None:
        raise TypeError(
            "cross-attention layers generate with a CrossAttentionInferenceContext "
            f"(lvx_megatron.core.inference_context), got {type(inference_context).__name__}"
        )
    if inference_context.sequence_len_offset == 0:
        if context is None:
            raise ValueError(f"layer {layer_number}: the prefill step needs context (the visual features X)")
        store[layer_number] = project_kv(context)
    elif layer_number not in store:
        raise ValueError(f"layer {layer_number}: no visual K/V cached; run the prefill step first")
    return store[layer_number]
