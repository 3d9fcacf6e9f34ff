"""Hugging Face mllama directory -> model-only distributed checkpoint (loads in any TP/PP/CP layout)
plus ``model.yaml``, a run config whose ``model`` section describes it. One process, on the CPU;
HF tensors are read one at a time into one converted copy of the model."""

import json
from pathlib import Path

import torch
import yaml

from lvx_megatron.hf.model import (
    DTYPES,
    build_skeleton,
    grouped,
    init_single_process,
    validated_run_config,
)


class HFReader:
    """Tensors of an HF checkpoint directory by hub name, read one at a time."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        from lvx_megatron.models.hf_mapping import hub_name

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"--hf-dir: no *.safetensors files in {directory}")
        self._handles = [safe_open(str(directory / f), framework="pt") for f in files]
        self._where = {}
        for handle in self._handles:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                self._where[hub_name(key)] = (handle, key)
        self.unused = set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"--hf-dir: tensor {name!r} is missing (does config.json match the weights?)")
        self.unused.discard(name)
        handle, key = self._where[name]
        return handle.get_tensor(key)


def _run_config_tree(model_section: dict, hf_dir: Path, out: Path, dtype: str) -> dict:
    """A complete run config around ``model_section``: data and training values are placeholders."""
    return {
        "model": model_section,
        "data": {
            "kind": "shards",
            "path": "/datasets/my_video_qa",
            "seq_length": 2048,
            "max_images": 4,
            "tokenizer": "huggingface",
            "tokenizer_path": str(hf_dir.resolve()),
        },
        "training": {
            "micro_batch_size": 1,
            "global_batch_size": 8,
            "train_iters": 1000,
            "lr": 1.0e-5,
            "min_lr": 1.0e-6,
            "lr_warmup_iters": 50,
            "precision": "bf16" if dtype == "bfloat16" else "fp32",
        },
        "checkpoint": {"load": str(out.resolve()), "save": None},
    }


def import_checkpoint(hf_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """HF directory -> model-only distributed checkpoint ``out/iter_0000000`` and ``out/model.yaml``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lvx_megatron.models import hf_mapping
    from lvx_megatron.models.weight_init import global_parameter_names
    from lvx_megatron.training.checkpointing import write_checkpoint
    from lvx_megatron.training.setup import init_model_parallel

    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--hf-dir: {config_path} does not exist")
    hf_config = json.loads(config_path.read_text())
    tree = _run_config_tree(hf_mapping.model_section_from_hf(hf_config), hf_dir, out, dtype)
    cfg = validated_run_config(tree)
    reader = HFReader(hf_dir)
    init_single_process()
    pg = init_model_parallel(cfg)  # TP = PP = CP = 1: every parameter whole, on one stage
    vocab = hf_config["text_config"]["vocab_size"]
    model = build_skeleton(cfg, vocab + hf_mapping.EXTRA_EMBEDDING_ROWS, pg, torch.device("cpu"), DTYPES[dtype])
    names = global_parameter_names(model)
    ours = {names[n]: p for n, p in model.named_parameters()}
    maps = hf_mapping.tensor_maps(list(ours), cfg.model.text.num_layers, cfg.model.text.cross_attention_layers)
    dims = hf_mapping.text_dims(tree["model"], vocab, model.text.padded_vocab_size)
    with torch.no_grad():
        for group, group_maps in grouped(maps).items():
            for m in group_maps:
                full = hf_mapping.to_ours(m, [reader.get(n) for n in m.hf], dims)
                target = ours[m.ours]
                if tuple(full.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{' + '.join(m.hf)} -> {m.ours}: shape {tuple(full.shape)}, the model built from config.json "
                        f"expects {tuple(target.shape)}"
                    )
                target.copy_(full)
            print(f"import: {group}: {len(group_maps)} tensors", flush=True)
    if reader.unused:
        raise ValueError(f"--hf-dir: {len(reader.unused)} tensors have no counterpart, e.g. {sorted(reader.unused)[0]}")
    state = {
        "model": model.sharded_state_dict(metadata={"non_homogeneous_layers": True}),
        "iteration": 0,
        "run_config": cfg.model_dump(mode="json"),
        "hf_config": hf_config,
    }
    path = write_checkpoint(state, out, 0)  # with its manifest, verified by every loader
    if dist.get_rank() == 0:
        header = (
            f"# Written by tools/convert_hf_checkpoint.py from {hf_dir.resolve()}/config.json.\n"
            "# model: the imported architecture (keep it). data, training, checkpoint: placeholders to edit.\n"
        )
        (out / "model.yaml").write_text(header + yaml.safe_dump(tree, sort_keys=False))
        print(f"import: wrote {path} and {out / 'model.yaml'}", flush=True)
    ps.destroy_model_parallel()
    return path
