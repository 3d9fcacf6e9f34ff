"""A small random Hugging Face Llama-3.2-Vision and gloo workers that run our forward on its inputs."""

import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")

VOCAB, IMAGE_TOKEN, TILES, TILE = 100, 99, 4, 16


def hf_config():
    """GQA 4/2, cross-attention at 1 and 4 of 6 layers, 2 local + 1 global vision layers, Llama-3 RoPE."""
    from transformers import MllamaConfig

    sizes = dict(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
    )
    text = dict(
        vocab_size=VOCAB,
        **sizes,
        cross_attention_layers=[1, 4],
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rope_theta=10.0,  # small theta: the scaled low frequencies matter within a short sequence
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        intermediate_size=64,
        image_size=TILE,
        patch_size=8,
        max_num_tiles=TILES,
        intermediate_layers_indices=[0, 1],
        vision_output_dim=96,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)


def make_hf_checkpoint(directory: Path) -> None:
    """Save a random model whose gates (text and vision) are all non-zero."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(hf_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name and param.numel() <= 1:  # the tanh gates (not the MLP gate_proj)
                param.uniform_(0.3, 1.0)
            elif name.endswith("embedding") or "tile_embedding" in name or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))  # make norms and embeddings non-trivial
    model.save_pretrained(directory)


def make_inputs(seed: int = 0) -> dict:
    """Two samples: text before the first image, 2 images with 2 and 4 tiles / 1 image + a padding image,
    right padding in the second sample."""
    gen = torch.Generator().manual_seed(seed)
    b, s, n = 2, 14, 2
    ids = torch.randint(4, IMAGE_TOKEN, (b, s), generator=gen)
    attention = torch.ones(b, s, dtype=torch.long)
    attention[1, -3:] = 0
    ids[1, -3:] = 3
    xmask = torch.zeros(b, s, n, TILES, dtype=torch.long)
    ratio_ids = torch.tensor([[2, 6], [1, 0]])  # (1, 2) grid; (2, 2) grid | (1, 1) grid; padding image
    tiles = [[2, 4], [1, 0]]
    ratio_mask = torch.zeros(b, n, TILES, dtype=torch.long)
    ratio_mask[:, :, 0] = 1  # as the processor: the first tile of every image, padding images too
    for sample, positions in enumerate([(3, 8), (2, None)]):
        for image, pos in enumerate(positions):
            if pos is None:
                continue
            ids[sample, pos] = IMAGE_TOKEN
            ratio_mask[sample, image, : tiles[sample][image]] = 1
            xmask[sample, pos:, image, : tiles[sample][image]] = 1
    xmask[1, -3:] = 0
    pixels = torch.randn(b, n, TILES, 3, TILE, TILE, generator=gen)
    text = dict(input_ids=ids, attention_mask=attention)
    return dict(
        text, pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask, cross_attention_mask=xmask
    )


def hf_logits(directory: Path, inputs: dict) -> torch.Tensor:
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def forward_layouts(rank: int, world_size: int, ckpt: str, inputs: dict, layouts: list) -> dict:
    """Worker: our logits for each (TP, CP, PP) layout (rank 0's result)."""
    from lvx_megatron.hf.forward import forward_logits

    results = {}
    for tp, cp, pp in layouts:
        results[(tp, cp, pp)] = forward_logits(Path(ckpt), inputs, tp, pp, cp)
    return results


def greedy_tokens(rank: int, world_size: int, ckpt: str, inputs: dict, steps: int) -> list[int]:
    """Worker: the argmax continuation of sample 0 with our forward over CP = world_size."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.hf.forward import load_model, logits_on_rank0

    model, vocab = load_model(Path(ckpt), 1, 1, world_size)
    sample = {k: v[:1] for k, v in inputs.items()}
    tokens = []
    for _ in range(steps):
        logits = logits_on_rank0(model, sample, vocab)
        best = torch.tensor([int(logits[0, -1].argmax()) if rank == 0 else 0])
        torch.distributed.broadcast(best, src=0)
        tokens.append(int(best))
        sample["input_ids"] = torch.cat([sample["input_ids"], best.view(1, 1)], dim=1)
        sample["attention_mask"] = torch.cat([sample["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        # HF's generate repeats the last row of the cross-attention mask for new tokens.
        xmask = sample["cross_attention_mask"]
        sample["cross_attention_mask"] = torch.cat([xmask, xmask[:, -1:]], dim=1)
    ps.destroy_model_parallel()
    return tokens


def train_state_from_import(rank: int, world_size: int, ckpt: str, precision: str) -> tuple[int, torch.Tensor, float]:
    """Worker: pretrain_mllm.py's state (TP = world_size) loading the imported checkpoint.

    Returns the iteration it starts at, the whole embedding, and the largest difference between the
    optimizer's main parameters and the model's after the load.
    """
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.tp_shards import unshard
    from lvx_megatron.training.checkpointing import load_checkpoint
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.setup import build_train_state, init_distributed

    device = init_distributed()
    overrides = {"parallel.tensor_model_parallel_size": world_size, "training.precision": precision}
    cfg = load_config(Path(ckpt) / "model.yaml", {**overrides, "checkpoint.load": ckpt})
    state = build_train_state(cfg, VOCAB + 1, device)
    iteration = load_checkpoint(state, cfg)
    weight = state.stage.embedding.word_embeddings.weight
    full = unshard(weight.detach().float(), weight, "embedding.word_embeddings.weight", True, state.pg.tp)
    gap = 0.0
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups, strict=True):
            for model_param, main_param in zip(model_group, main_group, strict=True):
                mine = opt._get_model_param_range_map(model_param)["param"]  # this rank's slice of the param
                shard = model_param.detach().view(-1)[mine.start : mine.end].float()
                gap = max(gap, float((shard - main_param).abs().max()))
    ps.destroy_model_parallel()
    return iteration, full, gap


def our_runs(rank: int, world_size: int, ckpt: str, inputs: dict, layouts: list, greedy_steps: int, train: bool):
    """Worker: everything the tests need from one group of processes (spawning costs seconds each)."""
    result = {"logits": forward_layouts(rank, world_size, ckpt, inputs, layouts)}
    if greedy_steps:
        result["greedy"] = greedy_tokens(rank, world_size, ckpt, inputs, greedy_steps)
    if train:
        result["train"] = train_state_from_import(rank, world_size, ckpt, "bf16")
    return result
