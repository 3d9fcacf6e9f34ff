"""Our newest distributed checkpoint -> a Hugging Face directory (``config.json`` + safetensors,
sharded with an index above a size) that ``MllamaForConditionalGeneration.from_pretrained`` loads."""

import json
import os
from pathlib import Path

import torch

from lvx_megatron.hf.model import (
    DTYPES,
    build_skeleton,
    chosen_checkpoint,
    grouped,
    init_single_process,
    validated_run_config,
)


class ShardWriter:
    """Writes HF tensors into safetensors files of at most ``max_bytes`` each (+ an index when several)."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.clone()  # own storage: safetensors refuses shared tensors
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f"part-{len(self.written):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        total = len(self.written)
        if total == 1:
            os.replace(self.written[0][0], self.out / "model.safetensors")
            return
        weight_map, size = {}, 0
        for i, (path, names, nbytes) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.out / final)
            weight_map |= dict.fromkeys(names, final)
            size += nbytes
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_checkpoint(
    load: Path,
    out: Path,
    dtype: str = "float32",
    hf_config: Path | None = None,
    vocab_size: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    allow_unverified: bool = False,
) -> None:
    """Our newest intact checkpoint under ``load`` -> HF directory ``out`` (config.json + safetensors); one that
    cannot be verified against a manifest only with ``allow_unverified``."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from lvx_megatron.models import hf_mapping
    from lvx_megatron.models.weight_init import global_parameter_names
    from lvx_megatron.training.checkpointing import load_model_weights, padded_vocab_size
    from lvx_megatron.training.setup import init_model_parallel

    init_single_process()
    path = chosen_checkpoint(load, allow_unverified).path
    common = dist_checkpointing.load_common_state_dict(str(path))
    run_config = dict(common["run_config"])
    run_config["parallel"] = {}  # export loads into one process
    cfg = validated_run_config(run_config)
    base = json.loads(hf_config.read_text()) if hf_config else common.get("hf_config")
    if vocab_size is None:
        if base is None:
            raise ValueError("--vocab-size: required when the checkpoint has no HF config and --hf-config is not given")
        vocab_size = base["text_config"]["vocab_size"]
    if base is None:
        print(
            "export: note: no --hf-config: config.json gets bos_token_id = eos_token_id = 0; set your tokenizer's ids",
            flush=True,
        )
    model_section = cfg.model.model_dump(mode="json")
    config_json = hf_mapping.hf_config_from_model(model_section, vocab_size, base)
    if cfg.model.cross_attention.blind_rows != "attend_all":
        print(
            "export: note: the checkpoint uses blind_rows='zero' (Meta's semantics); transformers lets text tokens "
            "that see no image attend to every visual token, so its logits differ at those positions",
            flush=True,
        )
    pg = init_model_parallel(cfg)
    padded = padded_vocab_size(path)
    model = build_skeleton(cfg, padded, pg, torch.device("cpu"), DTYPES[dtype])  # one copy, in the output dtype
    load_model_weights(model, path)
    names = global_parameter_names(model)
    params = {names[n]: p for n, p in model.named_parameters()}
    maps = hf_mapping.tensor_maps(list(params), cfg.model.text.num_layers, cfg.model.text.cross_attention_layers)
    dims = hf_mapping.text_dims(model_section, vocab_size, padded)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    with torch.no_grad():
        for group, group_maps in grouped(maps).items():
            for m in group_maps:
                for name, tensor in zip(m.hf, hf_mapping.to_hf(m, params[m.ours].detach(), dims), strict=True):
                    writer.add(name, tensor.to(DTYPES[dtype]))
            print(f"export: {group}: {len(group_maps)} tensors", flush=True)
    writer.close()
    config_json.pop("torch_dtype", None)  # the older name of "dtype"
    config_json["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config_json, indent=2))
    ps.destroy_model_parallel()
    print(f"export: wrote {out} ({len(writer.written)} safetensors file(s))", flush=True)
