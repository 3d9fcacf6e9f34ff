"""A checkpoint of any family, written by ``pretrain_mllm.py``, loaded for generation in a TP x CP layout."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from ..data.tokenizer import Tokenizer
from ..hf.model import chosen_checkpoint, init_single_process, validated_run_config
from ..models.vlm import VisionLanguageModel
from ..training.checkpointing import Chosen, check_same_model, load_model_weights
from ..training.config import RunConfig, load_config
from ..training.data import make_tokenizer
from ..training.setup import build_model, init_model_parallel, text_settings


@dataclass
class GenerationModel:
    """The loaded model (eval mode), its run config (with the generation layout), tokenizer, and which
    checkpoint it came from and why that one."""

    model: VisionLanguageModel
    cfg: RunConfig
    tokenizer: Tokenizer
    checkpoint: Chosen


def generation_config(cfg: RunConfig, tensor_parallel: int | None, context_parallel: int | None) -> RunConfig:
    """``cfg`` in the generation layout: TP (default: the run's) x CP (default: the rest of the world),
    pipeline size 1 and no sequence parallelism (any checkpoint loads into any layout)."""
    world = dist.get_world_size()
    tp = tensor_parallel or cfg.parallel.tensor_model_parallel_size
    cp = context_parallel or max(world // tp, 1)
    if world % (tp * cp):
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}) x --context-parallel-size ({cp}) must divide the number of "
            f"processes ({world})"
        )
    tree = cfg.model_dump(mode="json")
    tree["parallel"].update(
        tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=1, sequence_parallel=False
    )
    return validated_run_config(tree)


def in_run_precision(model: VisionLanguageModel) -> VisionLanguageModel:
    """``model`` in the dtype it trained in: a bf16 run's whole model in bf16, the vision side too, as
    megatron's ``Float16Module`` holds it in training (the generation loop casts the pixels to match)."""
    return model.to(model.config.params_dtype)


def load_for_generation(
    load: Path,
    config: Path | None = None,
    tensor_parallel: int | None = None,
    context_parallel: int | None = None,
    allow_unverified: bool = False,
) -> GenerationModel:
    """The newest intact checkpoint under ``load`` on this rank (collective over the world).

    ``config``: the run's YAML (default: the run config saved in the checkpoint; a given one must describe
    the checkpoint's model). A checkpoint that cannot be verified against a manifest only with
    ``allow_unverified``.
    """
    init_single_process()  # a world of one without torchrun; CPU compatibility for megatron
    chosen = chosen_checkpoint(Path(load), allow_unverified)
    path = chosen.path
    common = dist_checkpointing.load_common_state_dict(str(path))
    if config is None:
        if common.get("run_config") is None:
            raise ValueError(f"--config: {path} holds no run config; give the run's YAML")
        cfg = validated_run_config(common["run_config"])
    else:
        cfg = load_config(config)
    cfg = generation_config(cfg, tensor_parallel, context_parallel)
    tokenizer = make_tokenizer(cfg)
    if config is not None:
        check_same_model(path, common, cfg, text_settings(cfg, tokenizer.vocab_size).padded_vocab_size, "--config")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _, model = build_model(cfg, tokenizer.vocab_size, init_model_parallel(cfg), device)
    load_model_weights(model, path)
    return GenerationModel(in_run_precision(model).eval(), cfg, tokenizer, chosen)
