"""Plug lvx-megatron's context-parallel cross-attention into a megatron-core TransformerBlock.

Runs on CPU (gloo) or GPU (NCCL), one process or several:

    python examples/megatron_block.py                                     # one process
    torchrun --nproc-per-node 4 examples/megatron_block.py --tp 2 --cp 2  # TP=2 x CP=2

Each context-parallel rank holds a contiguous piece of the text and its own share of the visual
tokens (here: whole frames); the cross-attention layers move the text queries, not the video.
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_block import TransformerBlock

from lvx_megatron.core import CrossAttentionMask, CrossAttentionTransformerConfig, cross_attention_decoder_block_spec
from lvx_megatron.core.cpu_compat import enable_cpu_compat


def init_distributed() -> torch.device:
    """torchrun's environment, or a single local process."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        return torch.device("cuda")
    enable_cpu_compat()  # lets megatron-core run without CUDA; a no-op on GPU machines
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--tokens-per-frame", type=int, default=64)
    parser.add_argument("--text", type=int, default=32, help="text tokens (divisible by cp * tp)")
    args = parser.parse_args()

    device = init_distributed()
    parallel_state.initialize_model_parallel(args.tp, 1, context_parallel_size=args.cp)
    model_parallel_cuda_manual_seed(1234)
    pg = ProcessGroupCollection.use_mpu_process_groups()

    config = CrossAttentionTransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,  # GQA
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        tensor_model_parallel_size=args.tp,
        context_parallel_size=args.cp,
        sequence_parallel=args.tp > 1,
        use_cpu_initialization=device.type == "cpu",
        cross_attention_layers=[1, 3],  # the others are causal self-attention
        cross_attention_strategy="query_ring",
        recompute_visual_kv=True,
        visual_hidden_size=48,
        cross_attention_gate_init=0.1,
    )
    block = TransformerBlock(config, spec=cross_attention_decoder_block_spec(config), pg_collection=pg).to(device)

    # This CP rank's share: a contiguous piece of the text, whole frames of the video.
    cp_rank, tp_rank = pg.cp.rank(), pg.tp.rank()
    text_len = args.text // args.cp
    my_frames = [f for f in range(args.frames) if f % args.cp == cp_rank]
    torch.manual_seed(cp_rank)  # the data differs per CP rank and is the same across TP ranks
    hidden = torch.randn(text_len, 1, config.hidden_size, device=device)
    if config.sequence_parallel:  # megatron's sequence parallelism splits the text over TP too
        hidden = hidden.chunk(args.tp)[tp_rank]
    visual = torch.randn(len(my_frames) * args.tokens_per_frame, 1, config.visual_hidden_size, device=device)
    mask = CrossAttentionMask(
        # every text token sees every frame here; Llama-3.2-Vision masks are per image/tile
        q_image_mask=torch.ones(1, text_len, args.frames, dtype=torch.bool, device=device),
        kv_image_ids=torch.tensor(my_frames, device=device).repeat_interleave(args.tokens_per_frame)[None],
    )
    rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, use_cpu_initialization=True)
    rope = rotary.get_emb(args.text)[cp_rank * text_len : (cp_rank + 1) * text_len].to(device)

    out = block(hidden_states=hidden, attention_mask=None, context=visual, context_mask=mask, rotary_pos_emb=rope)
    loss = out.float().square().mean()
    loss.backward()
    if dist.get_rank() == 0:
        print(f"output {tuple(out.shape)} on {device}, loss {loss.item():.6f}, TP={args.tp} CP={args.cp}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return loss.item()


if __name__ == "__main__":
    main()
