"""Hugging Face Llama-3.2-Vision (mllama) <-> lvx-megatron: names, tensor layouts and configs.

Pure functions shared by ``tools/convert_hf_checkpoint.py`` and ``tools/mllama_forward.py``.
Names on the HF side are the hub layout (``language_model.model.layers.N...``,
``language_model.lm_head.weight``, ``vision_model.*``, ``multi_modal_projector.*``), which
``save_pretrained`` also writes; :func:`hub_name` maps the in-memory names of transformers 5.
Names on our side are global (decoder layers by their global index, TP 1, one pipeline stage).

Layouts that differ from HF's separate projections:

- ``linear_qkv``: per query group ``g``, the group's query heads, then its key head, then its value head.
- ``linear_kv`` (cross-attention): per group ``[k; v]``.
- ``linear_fc1``: ``[gate; up]`` (SwiGLU).
- ``embedding.word_embeddings``: HF's ``vocab_size + 8`` rows (the image rows included), zero-padded.
- ``output_layer``: HF's ``vocab_size`` rows, zero-padded (logits are cropped back to ``vocab_size``).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .mllama_vision import supported_aspect_ratios

# HF's embed_tokens has this many rows beyond vocab_size (room for the <|image|> token).
EXTRA_EMBEDDING_ROWS = 8
# megatron's Llama-3 RoPE scaling has these constants built in (only `factor` is configurable).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_TEXT = "language_model.model."


@dataclass(frozen=True)
class TensorMap:
    """One of our parameters and the HF tensors it is made of.

    Attributes:
        ours: our global parameter name.
        hf: the HF tensor names, in the order ``kind`` combines them.
        kind: ``copy``, ``qkv``, ``kv``, ``fc1``, ``embedding`` or ``output``.
        group: the progress group it belongs to (e.g. ``decoder layer 3 (cross-attention)``).
    """

    ours: str
    hf: tuple[str, ...]
    kind: str
    group: str


@dataclass(frozen=True)
class TextDims:
    """Decoder sizes the layout conversions need."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int  # HF's text vocab_size (lm_head rows)
    padded_vocab_size: int  # our embedding / output rows


def hub_name(name: str) -> str:
    """HF tensor name in the hub layout (transformers 5 in-memory names are mapped back)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix, hub in (("model.language_model.", _TEXT), ("model.vision_model.", "vision_model.")):
        if name.startswith(prefix):
            return hub + name[len(prefix) :]
    if name.startswith("model.multi_modal_projector."):
        return name[len("model.") :]
    return name


def _layer_maps(index: int, cross: bool) -> list[TensorMap]:
    ours, hf = f"decoder.layers.{index}.", f"{_TEXT}layers.{index}."
    group = f"decoder layer {index} ({'cross-attention' if cross else 'self-attention'})"
    attn = "cross_attn." if cross else "self_attn."
    maps = [
        (f"{ours}input_layernorm.weight", (f"{hf}input_layernorm.weight",), "copy"),
        (f"{ours}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",), "copy"),
        (f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "fc1"),
        (f"{ours}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), "copy"),
    ]
    if cross:
        mine = f"{ours}cross_attention."
        maps += [
            (f"{ours}cross_attn_attn_gate", (f"{hf}cross_attn_attn_gate",), "copy"),
            (f"{ours}cross_attn_mlp_gate", (f"{hf}cross_attn_mlp_gate",), "copy"),
            (f"{mine}linear_q.weight", (f"{hf}{attn}q_proj.weight",), "copy"),
            (f"{mine}linear_kv.weight", (f"{hf}{attn}k_proj.weight", f"{hf}{attn}v_proj.weight"), "kv"),
            (f"{mine}q_norm.weight", (f"{hf}{attn}q_norm.weight",), "copy"),
            (f"{mine}k_norm.weight", (f"{hf}{attn}k_norm.weight",), "copy"),
            (f"{mine}linear_proj.weight", (f"{hf}{attn}o_proj.weight",), "copy"),
        ]
    else:
        mine = f"{ours}self_attention."
        qkv = tuple(f"{hf}{attn}{p}_proj.weight" for p in "qkv")
        maps += [
            (f"{mine}linear_qkv.weight", qkv, "qkv"),
            (f"{mine}linear_proj.weight", (f"{hf}{attn}o_proj.weight",), "copy"),
        ]
    return [TensorMap(o, h, k, group) for o, h, k in maps]


def tensor_maps(our_names: list[str], num_layers: int, cross_attention_layers: list[int]) -> list[TensorMap]:
    """The map of every parameter in ``our_names`` (global names); unknown names raise ValueError."""
    by_name: dict[str, TensorMap] = {}
    for index in range(num_layers):
        for m in _layer_maps(index, index in cross_attention_layers):
            by_name[m.ours] = m
    by_name["embedding.word_embeddings.weight"] = TensorMap(
        "embedding.word_embeddings.weight", (f"{_TEXT}embed_tokens.weight",), "embedding", "embedding"
    )
    by_name["decoder.final_layernorm.weight"] = TensorMap(
        "decoder.final_layernorm.weight", (f"{_TEXT}norm.weight",), "copy", "final norm and output layer"
    )
    by_name["output_layer.weight"] = TensorMap(
        "output_layer.weight", ("language_model.lm_head.weight",), "output", "final norm and output layer"
    )
    maps = []
    for name in our_names:
        if name.startswith(("vision_model.", "multi_modal_projector.")):  # same names as HF
            group = "vision encoder" if name.startswith("vision_model.") else "projector"
            maps.append(TensorMap(name, (name,), "copy", group))
        elif name in by_name:
            maps.append(by_name[name])
        else:
            raise ValueError(f"parameter {name!r} has no Hugging Face counterpart")
    return maps


def to_ours(m: TensorMap, hf: list[Tensor], dims: TextDims) -> Tensor:
    """Combine the HF tensors of ``m`` into our parameter's full (TP 1) layout."""
    if m.kind == "copy":
        return hf[0]
    if m.kind == "fc1":
        return torch.cat(hf, dim=0)
    if m.kind in ("qkv", "kv"):
        per_group = [t.reshape(dims.num_groups, -1, t.shape[-1]) for t in hf]  # q: heads/groups heads; k, v: one
        return torch.cat(per_group, dim=1).reshape(-1, hf[0].shape[-1])
    if m.kind in ("embedding", "output"):
        extra = EXTRA_EMBEDDING_ROWS if m.kind == "embedding" else 0
        rows = dims.vocab_size + extra
        if hf[0].shape[0] != rows:
            raise ValueError(
                f"{m.hf[0]}: {hf[0].shape[0]} rows, expected text_config.vocab_size ({dims.vocab_size}) + {extra}"
            )
        out = hf[0].new_zeros(dims.padded_vocab_size, hf[0].shape[1])
        out[:rows] = hf[0]
        return out
    raise ValueError(f"unknown tensor map kind {m.kind!r}")


def to_hf(m: TensorMap, ours: Tensor, dims: TextDims) -> list[Tensor]:
    """Split our full (TP 1) parameter into the HF tensors of ``m`` (inverse of :func:`to_ours`)."""
    if m.kind == "copy":
        return [ours]
    if m.kind == "fc1":
        return list(ours.chunk(2, dim=0))
    d, groups, hidden = dims.head_dim, dims.num_groups, ours.shape[-1]
    if m.kind == "qkv":
        q_rows = dims.num_heads // groups * d
        q, k, v = ours.reshape(groups, q_rows + 2 * d, hidden).split([q_rows, d, d], dim=1)
        return [t.reshape(-1, hidden).contiguous() for t in (q, k, v)]
    if m.kind == "kv":
        k, v = ours.reshape(groups, 2 * d, hidden).split([d, d], dim=1)
        return [t.reshape(-1, hidden).contiguous() for t in (k, v)]
    if m.kind == "embedding":  # a model trained from scratch may have fewer padded rows: zeros
        rows = dims.vocab_size + EXTRA_EMBEDDING_ROWS
        return [torch.cat([ours[:rows], ours.new_zeros(max(rows - ours.shape[0], 0), ours.shape[1])]).contiguous()]
    if m.kind == "output":
        return [ours[: dims.vocab_size].contiguous()]
    raise ValueError(f"unknown tensor map kind {m.kind!r}")


# --- configs ---------------------------------------------------------------------------------


def _get(tree: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in tree or tree[key] is None:
        raise ValueError(f"config.json: {where}.{key} is missing")
    return tree[key]


def _rope(text: Mapping[str, Any]) -> tuple[float, bool, float]:
    """``(rotary_base, rope_scaling, rope_scaling_factor)``; raises for RoPE megatron cannot reproduce."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json: text_config.rope_theta is missing")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), False, 8.0
    if kind != "llama3":
        raise ValueError(f"config.json: text_config.rope_scaling.rope_type must be 'default' or 'llama3', got {kind!r}")
    for key, value in MEGATRON_LLAMA3_ROPE.items():
        if float(params.get(key, value)) != value:
            raise ValueError(
                f"config.json: text_config.rope_scaling.{key} must be {value} (megatron's Llama-3 RoPE scaling "
                f"has it built in), got {params[key]}"
            )
    return float(theta), True, float(_get(params, "factor", "text_config.rope_scaling"))


def vocab_multiple(vocab_size: int) -> int:
    """``make_vocab_size_divisible_by`` that pads both ``vocab_size + 1`` (a tokenizer with the
    ``<|image|>`` token, what training builds the model from) and the ``vocab_size + 8`` rows of
    HF's embedding to the same size."""
    multiple = 128
    while -(-(vocab_size + 1) // multiple) != -(-(vocab_size + EXTRA_EMBEDDING_ROWS) // multiple):
        multiple *= 2
    return multiple


def model_section_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config's ``model`` section for an HF ``MllamaConfig`` dict (``config.json``)."""
    text, vision = _get(config, "text_config", "<top>"), _get(config, "vision_config", "<top>")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: text_config.hidden_act must be 'silu', got {text['hidden_act']!r}")
    if text.get("tie_word_embeddings", False):
        raise ValueError("config.json: text_config.tie_word_embeddings must be false (mllama's head is untied)")
    if vision.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json: vision_config.hidden_act must be 'gelu', got {vision['hidden_act']!r}")
    if vision.get("num_channels", 3) != 3:
        raise ValueError(f"config.json: vision_config.num_channels must be 3, got {vision['num_channels']}")
    tiles = _get(vision, "max_num_tiles", "vision_config")
    ratios = vision.get("supported_aspect_ratios")
    if ratios is not None and [tuple(r) for r in ratios] != list(supported_aspect_ratios(tiles)):
        raise ValueError(
            "config.json: vision_config.supported_aspect_ratios must be every grid of at most max_num_tiles tiles "
            "in HF's default order"
        )
    theta, scaling, factor = _rope(text)
    hidden, heads = _get(text, "hidden_size", "text_config"), _get(text, "num_attention_heads", "text_config")
    vision_hidden = _get(vision, "hidden_size", "vision_config")
    indices = list(_get(vision, "intermediate_layers_indices", "vision_config"))
    declared = vision.get("vision_output_dim")
    if declared is not None and declared != vision_hidden * (1 + len(indices)):
        raise ValueError(
            f"config.json: vision_config.vision_output_dim ({declared}) must equal hidden_size * "
            f"(1 + len(intermediate_layers_indices)) = {vision_hidden * (1 + len(indices))}"
        )
    return {
        "text": {
            "num_layers": _get(text, "num_hidden_layers", "text_config"),
            "hidden_size": hidden,
            "ffn_hidden_size": _get(text, "intermediate_size", "text_config"),
            "num_attention_heads": heads,
            "num_query_groups": text.get("num_key_value_heads") or heads,
            "cross_attention_layers": list(_get(text, "cross_attention_layers", "text_config")),
            "rotary_base": theta,
            "rope_scaling": scaling,
            "rope_scaling_factor": factor,
            "norm_epsilon": float(text.get("rms_norm_eps", 1e-5)),
            "init_method_std": float(text.get("initializer_range", 0.02)),
            "make_vocab_size_divisible_by": vocab_multiple(_get(text, "vocab_size", "text_config")),
        },
        "vision": {
            "hidden_size": vision_hidden,
            "num_hidden_layers": _get(vision, "num_hidden_layers", "vision_config"),
            "num_global_layers": _get(vision, "num_global_layers", "vision_config"),
            "attention_heads": _get(vision, "attention_heads", "vision_config"),
            "intermediate_size": _get(vision, "intermediate_size", "vision_config"),
            "image_size": _get(vision, "image_size", "vision_config"),
            "patch_size": _get(vision, "patch_size", "vision_config"),
            "max_num_tiles": tiles,
            "intermediate_layers_indices": indices,
            "norm_eps": float(vision.get("norm_eps", 1e-5)),
        },
        "cross_attention": {"blind_rows": "attend_all"},  # HF's semantics, for logit parity
    }


def hf_config_from_model(model: Mapping[str, Any], vocab_size: int, base: Mapping[str, Any] | None) -> dict:
    """An HF ``MllamaConfig`` dict for our ``model`` section.

    ``base`` (the imported ``config.json``) supplies what our config does not hold (token ids,
    ``max_position_embeddings``, ...); an architecture field of ``base`` that disagrees with
    ``model`` raises ValueError naming it.
    """
    t, v = model["text"], model["vision"]
    rope: dict[str, Any] = {"rope_theta": t["rotary_base"], "rope_type": "default"}
    if t["rope_scaling"]:
        rope |= {"rope_type": "llama3", "factor": t["rope_scaling_factor"], **MEGATRON_LLAMA3_ROPE}
    text = {
        "model_type": "mllama_text_model",
        "vocab_size": vocab_size,
        "hidden_size": t["hidden_size"],
        "hidden_act": "silu",
        "num_hidden_layers": t["num_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_query_groups"] or t["num_attention_heads"],
        "intermediate_size": t["ffn_hidden_size"],
        "cross_attention_layers": list(t["cross_attention_layers"]),
        "rms_norm_eps": t["norm_epsilon"],
        "rope_parameters": rope,
        "tie_word_embeddings": False,
    }
    outputs = v["hidden_size"] * (1 + len(v["intermediate_layers_indices"]))
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": v["hidden_size"],
        "hidden_act": "gelu",
        "num_hidden_layers": v["num_hidden_layers"],
        "num_global_layers": v["num_global_layers"],
        "attention_heads": v["attention_heads"],
        "intermediate_size": v["intermediate_size"],
        "vision_output_dim": outputs,
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "norm_eps": v["norm_eps"],
        "max_num_tiles": v["max_num_tiles"],
        "intermediate_layers_indices": list(v["intermediate_layers_indices"]),
        # transformers derives them only for max_num_tiles 4; ours are the same grids in the same order.
        "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(v["max_num_tiles"])],
        "num_channels": 3,
    }
    out = {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"]}
    base = dict(base or {})
    if base:
        _check_agrees(base, model, vocab_size)
    else:  # the tokenizer's special ids are unknown; transformers' defaults (Llama 3's 128000...) may not fit
        text |= {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
    out |= {k: val for k, val in base.items() if k not in ("text_config", "vision_config")}
    out["text_config"] = {**(base.get("text_config") or {}), **text}
    out["text_config"].pop("rope_scaling", None)  # superseded by rope_parameters
    out["text_config"].pop("rope_theta", None)
    out["vision_config"] = {**(base.get("vision_config") or {}), **vision}
    return out


def _check_agrees(base: Mapping[str, Any], model: Mapping[str, Any], vocab_size: int) -> None:
    """Raise ValueError naming the first field where ``base`` describes another architecture."""
    mine = model_section_from_hf(base)
    if base["text_config"].get("vocab_size") != vocab_size:
        raise ValueError(
            f"text_config.vocab_size: the HF config has {base['text_config'].get('vocab_size')}, the checkpoint "
            f"{vocab_size}"
        )
    for section, hf_section in (("text", "text_config"), ("vision", "vision_config")):
        for key, value in mine[section].items():
            if key in ("init_method_std", "make_vocab_size_divisible_by"):
                continue
            if key == "num_query_groups":
                theirs = model[section][key] or model[section]["num_attention_heads"]
            else:
                theirs = model[section][key]
            if value != theirs:
                raise ValueError(
                    f"model.{section}.{key}: the checkpoint has {theirs}, the HF config's {hf_section} gives {value}"
                )


def text_dims(model: Mapping[str, Any], vocab_size: int, padded_vocab_size: int) -> TextDims:
    """:class:`TextDims` of a run config's ``model`` section."""
    t = model["text"]
    return TextDims(
        num_heads=t["num_attention_heads"],
        num_groups=t["num_query_groups"] or t["num_attention_heads"],
        head_dim=t["hidden_size"] // t["num_attention_heads"],
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size,
    )
