"""megatron-core configuration extended with the cross-attention settings of lvx-megatron."""

from dataclasses import dataclass, field

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from ..ops import BACKENDS, STRATEGIES


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
            ``"auto"`` (None: by backend, NCCL 100 GB/s and 10 us, gloo 1 GB/s and 50 us).
        cross_attention_backend: block-attention backend of the ops (``"auto"``, ``"torch"``,
            ``"fused"``).
        recompute_visual_kv: do not keep each layer's visual K/V for backward; recompute them
            from the shared visual features instead (exact gradients, less memory).
        visual_hidden_size: width of the visual features ``X`` fed to the K/V projections
            (defaults to ``hidden_size``).
        cross_attention_gate_init: initial value of the tanh gates (Llama-3.2-Vision: 0).
    """

    cross_attention_layers: list[int] = field(default_factory=list)
    cross_attention_strategy: str | list[str] = "query_ring"
    cross_attention_backend: str = "auto"
    recompute_visual_kv: bool = True
    visual_hidden_size: int | None = None
    cross_attention_gate_init: float = 0.0
    cross_attention_link_gbps: float | None = None
    cross_attention_link_latency_us: float | None = None

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
        strategies = self.cross_attention_strategy
        if isinstance(strategies, list):
            if len(strategies) != len(layers):
                raise ValueError(
                    f"cross_attention_strategy lists {len(strategies)} strategies for "
                    f"{len(layers)} cross_attention_layers; give one per layer or a single name"
                )
        else:
            strategies = [strategies]
        for name in strategies:
            if name not in STRATEGIES and name != "auto":
                raise ValueError(
                    f"cross_attention_strategy must be 'auto' or one of {sorted(STRATEGIES)}, got {name!r}"
                )
        if self.cross_attention_backend not in BACKENDS:
            raise ValueError(f"cross_attention_backend must be one of {BACKENDS}, got {self.cross_attention_backend!r}")

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
