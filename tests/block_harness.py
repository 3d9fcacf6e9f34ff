"""A small mllama-style decoder block run under any (TP, CP, PP) layout on gloo ranks.

Every layout fills its (sharded) parameters from the same deterministic full tensors, feeds the
same data through megatron's own pipeline schedules, and returns full-size gradients keyed by
global parameter names, so layouts can be compared with the single-process run.
"""

import warnings
import zlib

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
warnings.filterwarnings("ignore", message=".*absl.logging.*")

from lvx_megatron.core.tp_shards import full_shape, shard_full, unshard  # noqa: E402

TEXT, VISUAL, BATCH, N_IDS, MICROBATCHES = 12, 14, 2, 3, 2
HIDDEN, VIS_HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 32, 24, 4, 2, 8, 48
SIZES = dict(
    hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=HEAD_DIM, ffn_hidden_size=FFN
)


def make_config(
    tp: int, cp: int, pp: int, recompute: bool = True, num_layers: int = 4, cross_layers=(1, 3), **overrides
):
    """The block's config; ``overrides`` replace or add fields (e.g. the cross-attention strategy)."""
    from lvx_megatron.core import llama_style_config

    fields = dict(
        num_layers=num_layers,
        **SIZES,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=tp > 1,
        cross_attention_layers=list(cross_layers),
        cross_attention_strategy=["query_ring", "kv_ring"][: len(cross_layers)]
        if len(cross_layers) == 2
        else "query_ring",
        recompute_visual_kv=recompute,
        visual_hidden_size=VIS_HIDDEN,
        cross_attention_gate_init=0.5,
    )
    return llama_style_config(**{**fields, **overrides})


def global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(int(parts[i]) + offset)
    return ".".join(parts)


def full_value(name: str, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.3 * torch.randn(shape, generator=gen)


def make_data(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(MICROBATCHES):
        q_mask = torch.rand(BATCH, TEXT, N_IDS, generator=gen) < 0.6
        q_mask[:, :2] = False  # text before the first image
        batches.append(
            dict(
                hidden=torch.randn(TEXT, BATCH, HIDDEN, generator=gen),
                visual=torch.randn(VISUAL, BATCH, VIS_HIDDEN, generator=gen),
                q_mask=q_mask,
                ids=torch.randint(-1, N_IDS, (BATCH, VISUAL), generator=gen),
                target=torch.randn(TEXT, BATCH, HIDDEN, generator=gen),
            )
        )
    return batches


def _pieces(total: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of ``n`` contiguous pieces, the first ones one longer when uneven."""
    sizes = [len(t) for t in torch.tensor_split(torch.arange(total), n)]
    return [(sum(sizes[:i]), sizes[i]) for i in range(n)]


class _Stage(torch.nn.Module):
    """The block as one pipeline stage: megatron's schedules hand set_input_tensor a list."""

    def __init__(self, block) -> None:
        super().__init__()
        self.block = block
        self.config = block.config

    def set_input_tensor(self, tensors) -> None:
        self.block.set_input_tensor(tensors[0] if isinstance(tensors, list) else tensors)

    def forward(self, **kwargs):
        return self.block(**kwargs)


def build_block(tp: int, cp: int, pp: int, config, seed: int = 0):
    """Initialise megatron's parallel state on CPU and build this pipeline stage's block.

    Returns ``(block, pg_collection)``; the block's weights are megatron's own initialisation.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lvx_megatron.core import cross_attention_decoder_block_spec
    from lvx_megatron.core.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    pp_rank = pg.pp.rank()
    block = TransformerBlock(
        config,
        spec=cross_attention_decoder_block_spec(config, pp_rank=pp_rank),
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        pg_collection=pg,
    )
    return block, pg


def run_block(
    rank: int,
    world_size: int,
    tp: int,
    cp: int,
    pp: int,
    recompute: bool = True,
    seed: int = 0,
    overrides: dict | None = None,
) -> dict:
    """Worker: losses, dX/dH shards and full parameter gradients of one layout.

    ``overrides``: config fields for :func:`make_config`; the result's ``strategies`` are the
    cross-attention layers' strategies after the run (what ``"auto"`` chose).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.enums import ModelType
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from lvx_megatron.core import CrossAttentionMask
    from lvx_megatron.core.cross_attention import ContextParallelCrossAttention

    config = make_config(tp, cp, pp, recompute, **(overrides or {}))
    block, pg = build_block(tp, cp, pp, config, seed)
    tp_rank, cp_rank, pp_rank = pg.tp.rank(), pg.cp.rank(), pg.pp.rank()
    first, last = pp_rank == 0, pp_rank == pp - 1

    stage = _Stage(block)
    stage.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
    offset = get_transformer_layer_offset(config, None, pp_rank)
    with torch.no_grad():
        for name, param in block.named_parameters():
            gname = global_name(name, offset)
            param.copy_(
                shard_full(
                    full_value(gname, full_shape(param, tp), seed), param, name, config.gated_linear_unit, tp_rank, tp
                )
            )

    text_start, text_len = _pieces(TEXT, cp)[cp_rank]
    vis_start, vis_len = _pieces(VISUAL, cp)[cp_rank]
    sp_len = text_len // tp
    # The text is split into contiguous pieces (not megatron's zigzag): take this piece's rows of
    # the full table.
    rotary = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, use_cpu_initialization=True)
    rope = rotary.get_emb(TEXT)[text_start : text_start + text_len]
    batches = make_data(seed)
    leaves = []
    for b in batches:
        text = slice(text_start, text_start + text_len)
        sp = slice(tp_rank * sp_len, (tp_rank + 1) * sp_len)
        visual = b["visual"][vis_start : vis_start + vis_len].clone().requires_grad_()
        hidden = b["hidden"][text][sp].clone().requires_grad_()
        leaves.append(
            dict(
                hidden=hidden,
                visual=visual,
                mask=CrossAttentionMask(b["q_mask"][:, text], b["ids"][:, vis_start : vis_start + vis_len]),
                target=b["target"][text][sp],
            )
        )

    def forward_step(data_iterator, model):
        item = next(data_iterator)
        out = model(
            hidden_states=item["hidden"] if first else None,
            attention_mask=None,
            context=item["visual"],
            context_mask=item["mask"],
            rotary_pos_emb=rope,
        )

        def loss_func(output):
            loss = (output * item["target"]).sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(leaves),
        model=[stage],
        num_microbatches=MICROBATCHES,
        seq_length=TEXT,
        micro_batch_size=BATCH,
        forward_only=False,
    )

    # megatron's schedules scale each rank's loss by the CP size and its DDP averages gradients
    # over the DP x CP group; finalize_model_grads sums sequence-parallel norms and gates over TP.
    grads = {}
    for name, param in block.named_parameters():
        g = param.grad if param.grad is not None else torch.zeros_like(param)
        if cp > 1:
            dist.all_reduce(g, group=pg.cp)
            g /= cp
        if config.sequence_parallel and getattr(param, "sequence_parallel", False):
            dist.all_reduce(g, group=pg.tp)
        grads[global_name(name, offset)] = unshard(g, param, name, config.gated_linear_unit, pg.tp)
    # dX: each pipeline stage that owns cross-attention layers adds its part (see docs).
    # Inputs' gradients carry the CP loss scale that DDP's averaging removes for parameters.
    dx = [
        leaf["visual"].grad / cp if leaf["visual"].grad is not None else torch.zeros_like(leaf["visual"])
        for leaf in leaves
    ]
    for g in dx:
        dist.all_reduce(g, group=pg.pp)
    # Each last-stage (TP, CP) rank holds the loss of its own rows (TP splits rows under SP).
    loss_total = torch.tensor(float(sum(d["loss"] for d in losses)) if last else 0.0, dtype=torch.float64)
    dist.all_reduce(loss_total)
    ps.destroy_model_parallel()
    return dict(
        rank=rank,
        tp_rank=tp_rank,
        cp_rank=cp_rank,
        pp_rank=pp_rank,
        loss=loss_total.item(),
        grads=grads,
        dx=[(vis_start, vis_len, g) for g in dx],
        dh=[(text_start + tp_rank * sp_len, sp_len, leaf["hidden"].grad / cp) for leaf in leaves] if first else [],
        strategies=[m.strategy for m in block.modules() if isinstance(m, ContextParallelCrossAttention)],
    )


def saved_tensor_bytes(rank: int, world_size: int, num_cross_layers: int, recompute: bool, visual: int) -> dict:
    """Worker: what a block of ``num_cross_layers`` cross-attention layers saves for backward.

    Returns the bytes of distinct activation storages (parameters excluded) saved by autograd
    during one forward, whether any saved tensor is a per-layer visual K/V (its storage as large
    as one layer's K/V), and the size of one layer's K/V.
    """
    from megatron.core import parallel_state as ps

    from lvx_megatron.core import CrossAttentionMask

    config = make_config(1, 1, 1, recompute, num_layers=num_cross_layers, cross_layers=range(num_cross_layers))
    block, _ = build_block(1, 1, 1, config)
    text = 8
    hidden = torch.randn(text, 1, HIDDEN, requires_grad=True)
    x = torch.randn(visual, 1, VIS_HIDDEN, requires_grad=True)
    mask = CrossAttentionMask(torch.ones(1, text, 1, dtype=torch.bool), torch.zeros(1, visual, dtype=torch.long))
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights saved by matmuls cost no extra memory
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(hidden_states=hidden, attention_mask=None, context=x, context_mask=mask)
    out.sum().backward()
    kv_bytes = 2 * visual * GROUPS * HEAD_DIM * 4  # one layer's K and V, fp32, batch 1
    ps.destroy_model_parallel()
    return dict(
        saved_bytes=sum(storages.values()),
        kv_bytes=kv_bytes,
        saves_layer_kv=any(n >= kv_bytes // 2 and n != x.untyped_storage().nbytes() for n in storages.values()),
        grads_finite=all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None),
        x_grad_norm=float(x.grad.norm()),
    )


def frozen_visual_side(rank: int, world_size: int) -> dict:
    """Worker: recompute with a frozen K/V projection and an X that needs no gradient."""
    from megatron.core import parallel_state as ps

    config = make_config(1, 1, 1, True, num_layers=2, cross_layers=[1])
    block, _ = build_block(1, 1, 1, config)
    for name, param in block.named_parameters():
        param.requires_grad_("linear_kv" not in name and "k_norm" not in name)
    hidden = torch.randn(6, 1, HIDDEN, requires_grad=True)
    out = block(hidden_states=hidden, attention_mask=None, context=torch.randn(9, 1, VIS_HIDDEN))
    out.sum().backward()
    grads = {n: p.grad is not None for n, p in block.named_parameters()}
    ps.destroy_model_parallel()
    return grads
