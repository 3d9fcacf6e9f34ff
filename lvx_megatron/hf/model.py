"""What import, export and the HF-input forward share: a process world of one, the ``MllamaModel``
stage to fill or read, and the checkpoint and run config to read it from."""

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lvx_megatron.training.checkpointing import Chosen

# megatron-core and torch.distributed.checkpoint warnings that say nothing about a conversion or a
# forward (the command lines filter them; a library leaves the caller's filters alone).
UNINFORMATIVE_WARNINGS = (
    ".*(Transformer Engine|Apex|absl|async save|distributed is disabled|argument order|full scope).*"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from lvx_megatron.models.vlm import StageParts
    from lvx_megatron.training.families.mllama import vision_config
    from lvx_megatron.training.setup import text_settings, transformer_config

    config = transformer_config(cfg)
    config.params_dtype = dtype
    text = text_settings(cfg, vocab_size)
    model_parallel_cuda_manual_seed(cfg.training.seed)  # megatron's RNG tracker (forks it under SP)
    with torch.device("meta"):
        parts = StageParts(
            config, text, pg, pre_process=pg.pp.rank() == 0, post_process=pg.pp.rank() == pg.pp.size() - 1
        )
        model = MllamaModel(parts, vision_config(cfg), blind_rows=cfg.model.cross_attention.blind_rows)
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


def grouped(maps) -> dict[str, list]:
    """``hf_mapping`` tensor maps by their group (embedding, a layer, ...), in order."""
    groups: dict[str, list] = {}
    for m in maps:
        groups.setdefault(m.group, []).append(m)
    return groups


def validated_run_config(tree: dict):
    """The ``RunConfig`` of ``tree``; errors are one ``ConfigError`` line naming the field."""
    from pydantic import ValidationError

    from lvx_megatron.training.config import ConfigError, RunConfig, _one_line

    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def add_allow_unverified_flag(parser) -> None:
    """``--allow-unverified`` of the tools that load a checkpoint (see :func:`chosen_checkpoint`)."""
    parser.add_argument(
        "--allow-unverified", action="store_true", help="use a checkpoint that has no manifest to check it against"
    )


def chosen_checkpoint(load: Path, allow_unverified: bool = False) -> "Chosen":
    """The checkpoint under ``load`` that training would resume from (``training.checkpointing.Chosen``): the
    tracker's if it is intact, else the newest older intact one, each one passed over and the one used
    printed (collective; after :func:`init_single_process`). One that cannot be verified (a checkpoint set
    saved before manifests existed) is refused unless ``allow_unverified``."""
    from lvx_megatron.training.checkpoint_integrity import MANIFEST
    from lvx_megatron.training.checkpointing import newest_intact

    found = newest_intact(load, setting="--load")
    if found is None:
        raise ValueError(f"--load: no checkpoint in {load} (no latest_checkpointed_iteration.txt)")
    if not found.verified and not allow_unverified:
        raise ValueError(
            f"--load: {found.path} has no {MANIFEST}, so its files cannot be checked (saved before manifests "
            "existed?); pass --allow-unverified to use it anyway"
        )
    return found
