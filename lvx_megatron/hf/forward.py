"""Full float32 logits of a Llama-3.2-Vision checkpoint on Hugging Face ``MllamaProcessor`` tensors,
in any TP/PP/CP layout. The sequence is padded to a multiple of CP (x TP under sequence
parallelism) inside and cropped back; padding must be on the right (``attention_mask``)."""

from pathlib import Path

import torch
import torch.distributed as dist

from lvx_megatron.hf.model import build_skeleton, chosen_checkpoint, init_single_process, validated_run_config

KEYS = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def _check_inputs(inputs: dict) -> None:
    missing = [k for k in KEYS if k not in inputs]
    if missing:
        raise ValueError(f"--inputs: missing {missing[0]!r} (needs {', '.join(KEYS)})")
    mask = inputs["attention_mask"].bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("--inputs: attention_mask has left padding; only right padding is supported")


def _pad_sequence(inputs: dict, multiple: int) -> dict:
    """Pad ``input_ids`` and ``cross_attention_mask`` on the right to a multiple of ``multiple``."""
    s = inputs["input_ids"].shape[1]
    extra = -s % multiple
    if not extra:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.nn.functional.pad(inputs["input_ids"], (0, extra))
    out["cross_attention_mask"] = torch.nn.functional.pad(inputs["cross_attention_mask"], (0, 0, 0, 0, 0, extra))
    return out


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def load_model(
    load: Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    allow_unverified: bool = False,
):
    """This rank's float32 stage of the newest intact checkpoint under ``load`` in the given layout, and the
    HF vocabulary size (None when the checkpoint does not record it). Collective over the world. A
    checkpoint that cannot be verified against a manifest only with ``allow_unverified``."""
    from megatron.core import dist_checkpointing

    from lvx_megatron.training.checkpointing import load_model_weights, padded_vocab_size
    from lvx_megatron.training.setup import init_model_parallel

    init_single_process()  # joins a world of one without torchrun; CPU compatibility for megatron
    path = chosen_checkpoint(load, allow_unverified).path
    common = dist_checkpointing.load_common_state_dict(str(path))
    tree = dict(common["run_config"])
    tree["parallel"] = {
        **tree.get("parallel", {}),
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": pipeline_parallel,
        "context_parallel_size": context_parallel,
    }
    tree["training"] = {**tree["training"], "precision": "fp32"}
    cfg = validated_run_config(tree)
    pg = init_model_parallel(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_skeleton(cfg, padded_vocab_size(path), pg, device, torch.float32)
    load_model_weights(model, path)
    model.eval()
    return model, (common.get("hf_config") or {}).get("text_config", {}).get("vocab_size")


@torch.no_grad()
def logits_on_rank0(model, inputs: dict, vocab_size: int | None = None) -> torch.Tensor | None:
    """Float32 logits ``[B, S, vocab]`` of ``model`` (from :func:`load_model`) on global rank 0, else None."""
    from megatron.core import parallel_state as ps

    _check_inputs(inputs)
    device = model.output_layer.weight.device if model.post_process else model.embedding.word_embeddings.weight.device
    vocab_size = vocab_size or model.text.padded_vocab_size
    b, s = inputs["input_ids"].shape
    tp, cp, pp = model.pg_collection.tp, model.pg_collection.cp, model.pg_collection.pp
    multiple = cp.size() * (tp.size() if model.config.sequence_parallel else 1)
    batch = {k: v.to(device) for k, v in _pad_sequence(inputs, multiple).items()}
    n, t = batch["cross_attention_mask"].shape[2:]
    if not model.pre_process:
        shape = model.pipeline_tensor_shape(batch["input_ids"].shape[1], b, n, t)
        received = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(received, src=dist.get_global_rank(pp, pp.rank() - 1))
        model.set_input_tensor(received)
    out = model(
        tokens=batch["input_ids"],
        cross_attention_mask=batch["cross_attention_mask"],
        aspect_ratio_mask=batch["aspect_ratio_mask"],
        pixel_values=batch["pixel_values"].float(),
        aspect_ratio_ids=batch["aspect_ratio_ids"],
    )
    if not model.post_process:
        dist.send(out.contiguous(), dst=dist.get_global_rank(pp, pp.rank() + 1))
    writer = model.post_process and tp.rank() == 0 and cp.rank() == 0 and ps.get_data_parallel_rank() == 0
    logits = None
    if model.post_process:  # [B, S/cp, V/tp] -> [B, S, V] on every rank of the last stage
        logits = _gather(_gather(out.float(), tp, dim=-1), cp, dim=1)[:, :s, :vocab_size].contiguous()
    # Collectives on `device`: NCCL moves only CUDA tensors.
    source = torch.tensor([dist.get_rank() if writer else 0], device=device)
    dist.all_reduce(source)
    source = int(source)
    if source != 0 and dist.get_rank() in (0, source):
        if dist.get_rank() == source:
            dist.send(logits, dst=0)
        else:
            logits = torch.empty(b, s, vocab_size, device=device)
            dist.recv(logits, src=source)
    return logits.cpu() if dist.get_rank() == 0 else None


def forward_logits(
    load: Path,
    inputs: dict,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    vocab_size: int | None = None,
    allow_unverified: bool = False,
) -> torch.Tensor | None:
    """:func:`load_model` then :func:`logits_on_rank0` (HF's vocabulary unless ``vocab_size``)."""
    from megatron.core import parallel_state as ps

    _check_inputs(inputs)
    model, hf_vocab = load_model(load, tensor_parallel, pipeline_parallel, context_parallel, allow_unverified)
    try:
        return logits_on_rank0(model, inputs, vocab_size or hf_vocab)
    finally:
        ps.destroy_model_parallel()
