"""megatron-core configuration extended with the cross-attention settings of lvx-megatron."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from pydantic import PositiveFloat, PositiveInt

from ..ops import AUTO, LinkSettings, SettingFields, SharedComm, check_cross_attention_settings
from ..ops.policy import LINK_SOURCES

# The settings of a run config's section ``model.cross_attention`` (lvx_megatron.training.config),
# by their name there, and the field of this config each one is. The section's fields are made
# from these fields (type and default), so each setting is defined once, here.
SECTION_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "strategy": "cross_attention_strategy",
        "backend": "cross_attention_backend",
        "recompute_visual_kv": "recompute_visual_kv",
        "gate_init": "cross_attention_gate_init",
        "link_gbps": "cross_attention_link_gbps",
        "link_latency_us": "cross_attention_link_latency_us",
        "ranks_per_node": "cross_attention_ranks_per_node",
        "inner_link_gbps": "cross_attention_inner_link_gbps",
        "inner_link_latency_us": "cross_attention_inner_link_latency_us",
        "link": "cross_attention_link",
    }
)


# How this config names the settings the ops check (lvx_megatron.ops.settings).
CORE_FIELDS = SettingFields(
    strategy="cross_attention_strategy",
    backend="cross_attention_backend",
    ranks_per_node="cross_attention_ranks_per_node",
    layers="cross_attention_layers",
)


@dataclass
class CrossAttentionTransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus the settings of the context-parallel cross-attention layers.

    Attributes:
        cross_attention_layers: 0-based indices (over the whole decoder) of the gated
            cross-attention layers; all other layers are causal self-attention.
        cross_attention_strategy: one strategy for every cross-attention layer, or one per
            cross-attention layer (in the order of ``cross_attention_layers``); ``"auto"`` lets the
            cost model pick at the layer's first call (``lvx_megatron.ops.auto``).
        cross_attention_link_gbps, cross_attention_link_latency_us: the CP ring's link for
            ``"auto"`` (None: by backend, NCCL 100 GB/s and 10 us, gloo 1 GB/s and 50 us); with
            ``cross_attention_ranks_per_node``, the link between nodes.
        cross_attention_ranks_per_node: CP ranks per node (consecutive CP ranks form a node).
            Enables ``"hierarchical"`` (Q all-gather inside a node, query ring across nodes), as a
            strategy and as a candidate of ``"auto"``; must divide ``context_parallel_size``.
        cross_attention_inner_link_gbps, cross_attention_inner_link_latency_us: the link inside
            a node, with ``cross_attention_ranks_per_node`` (None: by backend, as above).
        cross_attention_link: where ``"auto"`` gets its links: ``"config"`` (the fields above)
            or ``"probe"`` (measured once over the CP group, or inside and between nodes, at the
            first ``"auto"`` call; ``lvx_megatron.ops.link_probe``).
        cross_attention_backend: block-attention backend of the ops (``"auto"``, ``"triton"``,
            ``"fused"``, ``"torch"``).
        recompute_visual_kv: do not keep each layer's visual K/V for backward; recompute them
            from the shared visual features instead (exact gradients, less memory).
        visual_hidden_size: width of the visual features ``X`` fed to the K/V projections
            (defaults to ``hidden_size``).
        cross_attention_gate_init: initial value of the tanh gates (Llama-3.2-Vision: 0;
            mPLUG-Owl3: the per-channel gate before its sigmoid).
        cross_attention_shared: not a setting: the groups and links the model's cross-attention
            layers share (:class:`~lvx_megatron.ops.SharedComm`, filled at their first calls).

    The strategy defaults to ``"auto"``, as in a run config and the ops: see ``docs/ops.md``
    ("Strategy settings").
    """

    cross_attention_layers: list[int] = field(default_factory=list)
    cross_attention_strategy: str | list[str] = AUTO
    cross_attention_backend: str = "auto"
    recompute_visual_kv: bool = True
    visual_hidden_size: int | None = None
    cross_attention_gate_init: float = 0.0
    # Positive when given (the run config's schema checks; the links' arithmetic needs it).
    cross_attention_link_gbps: PositiveFloat | None = None
    cross_attention_link_latency_us: PositiveFloat | None = None
    cross_attention_ranks_per_node: PositiveInt | None = None
    cross_attention_inner_link_gbps: PositiveFloat | None = None
    cross_attention_inner_link_latency_us: PositiveFloat | None = None
    cross_attention_link: Literal[LINK_SOURCES] = "config"
    cross_attention_shared: SharedComm = field(default_factory=SharedComm, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.visual_hidden_size is None:
            self.visual_hidden_size = self.hidden_size
        layers = list(self.cross_attention_layers)
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"cross_attention_layers must be distinct indices in [0, num_layers={self.num_layers}), got {layers}"
            )
        self.cross_attention_layers = sorted(layers)
        check_cross_attention_settings(
            self.cross_attention_strategy,
            self.cross_attention_backend,
            self.cross_attention_ranks_per_node,
            layers,
            CORE_FIELDS,
        )
        self._check_links()

    def _check_links(self) -> None:
        """Raise ValueError naming the field for inconsistent topology and link settings."""
        per_node, cp = self.cross_attention_ranks_per_node, self.context_parallel_size
        if per_node is not None and (
            isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1 or cp % per_node
        ):
            raise ValueError(
                f"cross_attention_ranks_per_node must be None or a positive divisor of "
                f"context_parallel_size ({cp}), got {per_node!r}"
            )
        if per_node is None:
            for name in ("cross_attention_inner_link_gbps", "cross_attention_inner_link_latency_us"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs cross_attention_ranks_per_node (the CP ranks of one node)")
        if self.cross_attention_link not in LINK_SOURCES:
            raise ValueError(
                f"cross_attention_link must be one of {list(LINK_SOURCES)}, got {self.cross_attention_link!r}"
            )
        if self.cross_attention_link == "probe":
            given = [
                name
                for name in (
                    "cross_attention_link_gbps",
                    "cross_attention_link_latency_us",
                    "cross_attention_inner_link_gbps",
                    "cross_attention_inner_link_latency_us",
                )
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(f"cross_attention_link='probe' measures the links: leave {given} unset (None)")

    def cross_attention_link_settings(self) -> LinkSettings:
        """What ``"auto"`` assumes of the CP group, and its split into nodes, for the ops."""
        return LinkSettings(
            source=self.cross_attention_link,
            ranks_per_node=self.cross_attention_ranks_per_node,
            gbps=self.cross_attention_link_gbps,
            latency_us=self.cross_attention_link_latency_us,
            inner_gbps=self.cross_attention_inner_link_gbps,
            inner_latency_us=self.cross_attention_inner_link_latency_us,
        )

    def strategy_for_layer(self, layer_index: int) -> str:
        """The strategy of the cross-attention layer at 0-based decoder index ``layer_index``."""
        if isinstance(self.cross_attention_strategy, str):
            return self.cross_attention_strategy
        return self.cross_attention_strategy[self.cross_attention_layers.index(layer_index)]


def llama_style_config(**fields) -> CrossAttentionTransformerConfig:
    """A config with Llama 3's decoder choices (RMSNorm, SwiGLU, no biases, no dropout, CPU init).

    ``fields`` give the sizes, parallelism and cross-attention settings, and may override a choice.
    """
    choices = dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return CrossAttentionTransformerConfig(**{**choices, **fields})
