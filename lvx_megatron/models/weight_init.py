"""Initialisation that does not depend on the parallel layout.

Every parameter is drawn as a whole tensor from a generator seeded by the run's seed and the
parameter's *global* name (decoder layers renamed by their global index), and each rank keeps its
tensor-parallel shard. A (TP, CP, PP) = (2, 1, 1) run therefore starts from exactly the weights of
a (1, 1, 2) run, so runs in different layouts can be compared step by step, and changing the
layout of an experiment does not change its starting point.
"""

import math
import zlib

import torch
from megatron.core.transformer.module import MegatronModule

from ..core.tp_shards import full_shape, shard_full

_ONES = ("norm.weight", "norm1.weight", "norm2.weight", "layernorm_pre.weight", "layernorm_post.weight")
# Llama-3.2-Vision draws these with std hidden**-0.5 (not init_method_std): at 0.02 the patch
# positions are drowned by the patch contents and the encoder learns where things are slowly.
# The ViTs' class/position embeddings and the resampler's latents and time embeddings likewise.
_VISION_EMBEDDINGS = (
    "vision_model.class_embedding",
    "vision_model.gated_positional_embedding.embedding",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding.weight",
    "perceiver.latents",
    "perceiver.frame_embs",
    "perceiver.media_time_embs",
)
_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")


def global_parameter_names(model: MegatronModule) -> dict[str, str]:
    """Local parameter name -> name with every decoder layer's global index."""
    names = {}
    layers = model.decoder.layers
    for local_index, layer in enumerate(layers):
        local = f"decoder.layers.{local_index}."
        for name, _ in layer.named_parameters(prefix=local[:-1]):
            names[name] = f"decoder.layers.{layer.layer_number - 1}." + name[len(local) :]
    for name, _ in model.named_parameters():
        names.setdefault(name, name)
    return names


def _initial_value(name: str, shape: list[int], seed: int, std: float, num_layers: int, gate: float, vision_std: float):
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name.endswith(_ONES):
        return torch.ones(shape)
    if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "hyper_gate")):
        return torch.full(shape, gate)
    if name.endswith(("gate", "gate_attn", "gate_ffn")):  # vision encoder gates start closed
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name in _VISION_EMBEDDINGS:
        scale = vision_std
    elif name.startswith("decoder.") and name.endswith(_RESIDUAL_OUT):
        scale = std / math.sqrt(2.0 * num_layers)
    else:
        scale = std
    return scale * torch.randn(shape, generator=gen)


@torch.no_grad()
def initialize_by_name(model: MegatronModule, seed: int) -> None:
    """Fill every parameter of ``model`` (one pipeline stage) as described in the module docstring.

    Weights ~ N(0, init_method_std) (residual output projections scaled by ``1/sqrt(2 * layers)``;
    the vision class and positional embeddings and the resampler's latents ~ N(0, vision_hidden**-0.5)),
    norms 1, biases 0, cross-attention and hyper-attention gates ``config.cross_attention_gate_init``,
    vision gates 0.
    """
    config = model.config
    tp_group = model.pg_collection.tp
    tp, tp_rank = tp_group.size(), tp_group.rank()
    names = global_parameter_names(model)
    for name, param in model.named_parameters():
        gname = names[name]
        full = _initial_value(
            gname,
            full_shape(param, tp),
            seed,
            config.init_method_std,
            config.num_layers,
            config.cross_attention_gate_init,
            model.vision_config.hidden_size**-0.5,
        )
        # OpenFlamingo's gated blocks have a plain GELU feed-forward whatever the decoder's MLP is.
        glu = config.gated_linear_unit and ".gated_cross_attention." not in name
        param.copy_(shard_full(full, param, name, glu, tp_rank, tp))
