"""Convert Llama-3.2-Vision checkpoints between Hugging Face and lvx-megatron.

    python tools/convert_hf_checkpoint.py import --hf-dir HF --out CKPT [--dtype bfloat16]
    python tools/convert_hf_checkpoint.py export --load CKPT --out HF [--dtype bfloat16]

``import`` writes a megatron-core distributed checkpoint (model weights only, loads in any
TP/PP/CP layout: ``pretrain_mllm.py --load CKPT``) plus ``CKPT/model.yaml``, a run config whose
``model`` section describes the checkpoint. ``export`` writes ``config.json`` and safetensors
files (sharded with an index above ``--max-shard-size``) that
``transformers.MllamaForConditionalGeneration.from_pretrained`` loads. Both run in one process on
the CPU and hold at most one converted copy of the model in memory (HF tensors are read one at a
time). Name and layout mapping: ``lvx_megatron/models/hf_mapping.py``.
"""

import argparse
import json
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python tools/...`
# megatron-core and torch.distributed.checkpoint warnings that say nothing about the conversion.
warnings.filterwarnings(
    "ignore", message=".*(Transformer Engine|Apex|absl|async save|distributed is disabled|argument order|full scope).*"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _log(message: str) -> None:
    print(message, flush=True)


def init_single_process() -> None:
    """A world of one (gloo) unless this process already joined one (tests, torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:  # a free port: another job may hold megatron's default
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from lvx_megatron.training.setup import init_distributed

    init_distributed()


def build_skeleton(cfg, vocab_size: int, pg, device: torch.device, dtype: torch.dtype):
    """This pipeline stage's ``MllamaModel`` with uninitialised weights (built on the meta device,
    so no time goes into random initialisation and only one copy of the weights is allocated)."""
    from megatron.core.enums import ModelType
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from lvx_megatron.core.cpu_compat import mark_cpu_parameters
    from lvx_megatron.models.mllama import MllamaModel
    from lvx_megatron.training.setup import text_settings, transformer_config, vision_config

    config = transformer_config(cfg)
    config.params_dtype = dtype
    text = text_settings(cfg, vocab_size)
    model_parallel_cuda_manual_seed(cfg.training.seed)  # megatron's RNG tracker (forks it under SP)
    with torch.device("meta"):
        model = MllamaModel(
            config,
            text,
            vision_config(cfg),
            pg,
            pre_process=pg.pp.rank() == 0,
            post_process=pg.pp.rank() == pg.pp.size() - 1,
            blind_rows=cfg.model.cross_attention.blind_rows,
        )
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                # Module.to_empty would drop megatron's attributes (tensor_model_parallel, ...).
                fresh = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                fresh.__dict__.update(param.__dict__)
                module._parameters[name] = fresh
    model.model_type = ModelType.encoder_or_decoder
    mark_cpu_parameters(model)
    return model


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


def _grouped(maps) -> dict[str, list]:
    groups: dict[str, list] = {}
    for m in maps:
        groups.setdefault(m.group, []).append(m)
    return groups


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


def validated_run_config(tree: dict):
    """The ``RunConfig`` of ``tree``; errors are one ``ConfigError`` line naming the field."""
    from pydantic import ValidationError

    from lvx_megatron.training.config import ConfigError, RunConfig, _one_line

    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def import_checkpoint(hf_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """HF directory -> model-only distributed checkpoint ``out/iter_0000000`` and ``out/model.yaml``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lvx_megatron.models import hf_mapping
    from lvx_megatron.models.init import global_parameter_names
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
        for group, group_maps in _grouped(maps).items():
            for m in group_maps:
                full = hf_mapping.to_ours(m, [reader.get(n) for n in m.hf], dims)
                target = ours[m.ours]
                if tuple(full.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{' + '.join(m.hf)} -> {m.ours}: shape {tuple(full.shape)}, the model built from config.json "
                        f"expects {tuple(target.shape)}"
                    )
                target.copy_(full)
            _log(f"import: {group}: {len(group_maps)} tensors")
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
        _log(f"import: wrote {path} and {out / 'model.yaml'}")
    ps.destroy_model_parallel()
    return path


def checkpoint_path(load: Path) -> Path:
    """The checkpoint under ``load`` that training would resume from: the tracker's if it is intact, else
    the newest older intact one, each one passed over printed (collective; after :func:`init_single_process`)."""
    from lvx_megatron.training.checkpointing import newest_intact

    found = newest_intact(load, setting="--load")
    if found is None:
        raise ValueError(f"--load: no checkpoint in {load} (no latest_checkpointed_iteration.txt)")
    return found[1]


def padded_vocab_size(path: Path) -> int:
    """Rows of the checkpoint's (padded) embedding, from its metadata."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(str(path))["embedding.word_embeddings.weight"].global_shape[0]


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
) -> None:
    """Our newest checkpoint under ``load`` -> HF directory ``out`` (config.json + safetensors)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from lvx_megatron.models import hf_mapping
    from lvx_megatron.models.init import global_parameter_names
    from lvx_megatron.training.checkpointing import load_model_weights
    from lvx_megatron.training.setup import init_model_parallel

    init_single_process()
    path = checkpoint_path(load)
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
        _log("export: note: no --hf-config: config.json gets bos_token_id = eos_token_id = 0; set your tokenizer's ids")
    model_section = cfg.model.model_dump(mode="json")
    config_json = hf_mapping.hf_config_from_model(model_section, vocab_size, base)
    if cfg.model.cross_attention.blind_rows != "attend_all":
        _log(
            "export: note: the checkpoint uses blind_rows='zero' (Meta's semantics); transformers lets text tokens "
            "that see no image attend to every visual token, so its logits differ at those positions"
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
        for group, group_maps in _grouped(maps).items():
            for m in group_maps:
                for name, tensor in zip(m.hf, hf_mapping.to_hf(m, params[m.ours].detach(), dims), strict=True):
                    writer.add(name, tensor.to(DTYPES[dtype]))
            _log(f"export: {group}: {len(group_maps)} tensors")
    writer.close()
    config_json.pop("torch_dtype", None)  # the older name of "dtype"
    config_json["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config_json, indent=2))
    ps.destroy_model_parallel()
    _log(f"export: wrote {out} ({len(writer.written)} safetensors file(s))")


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF mllama directory -> distributed checkpoint + model.yaml")
    imp.add_argument("--hf-dir", type=Path, required=True, help="config.json + *.safetensors [+ index json]")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (--load of training)")
    imp.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored weights")
    exp = sub.add_parser("export", help="distributed checkpoint -> HF directory")
    exp.add_argument("--load", type=Path, required=True, help="checkpoint directory (its newest iteration)")
    exp.add_argument("--out", type=Path, required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written safetensors")
    exp.add_argument(
        "--hf-config", type=Path, help="config.json to start from (default: the one stored by import, if any)"
    )
    exp.add_argument("--vocab-size", type=int, help="text vocab_size, when neither --hf-config nor import gives it")
    exp.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lvx_megatron.training.checkpointing import CheckpointSaveError

    try:
        if args.command == "import":
            import_checkpoint(args.hf_dir, args.out, args.dtype)
        else:
            export_checkpoint(args.load, args.out, args.dtype, args.hf_config, args.vocab_size, args.max_shard_size)
    except ValueError as exc:  # ConfigError included: one line naming the field
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointSaveError, OSError) as exc:  # a full disk, an unwritable --out: one line naming the path
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
