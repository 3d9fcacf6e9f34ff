"""Process groups, model, optimizer and LR schedule of a run, with megatron-core's own parts.

The model is wrapped in megatron's ``DistributedDataParallel`` (gradient buckets reduced over
the data-parallel x context-parallel group), the optimizer is megatron's (distributed optimizer
by default, gradient clipping), and the schedule is ``OptimizerParamScheduler``. The same code
runs on CPU (gloo, see :mod:`lvx_megatron.core.cpu_compat`) and on GPUs (NCCL).
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from ..core import CrossAttentionTransformerConfig, llama_style_config
from ..core.cpu_compat import enable_cpu_compat, mark_cpu_parameters
from ..models.vlm import StageParts, TextSettings, VisionLanguageModel
from ..models.weight_init import initialize_by_name
from .config import RunConfig, from_section
from .families import family


def init_distributed() -> torch.device:
    """Join the torchrun job (or a 1-process job without torchrun); NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python pretrain_mllm.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    if not cuda:
        enable_cpu_compat()
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def init_model_parallel(cfg: RunConfig) -> ProcessGroupCollection:
    """megatron's TP/CP/PP/DP groups for this run (``layout.validate_layout`` checks them first)."""
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def transformer_config(cfg: RunConfig) -> CrossAttentionTransformerConfig:
    """The decoder's megatron config from the run config."""
    t, p, x = cfg.model.text, cfg.parallel, cfg.model.cross_attention
    bf16 = cfg.training.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # The text section's sizes, named as the core config's fields.
    sizes = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "add_qkv_bias")
    return llama_style_config(
        **{name: getattr(t, name) for name in sizes},
        kv_channels=t.hidden_size // t.num_attention_heads,
        gated_linear_unit=t.mlp == "swiglu",
        activation_func=F.silu if t.mlp == "swiglu" else F.gelu,
        layernorm_epsilon=t.norm_epsilon,
        init_method_std=t.init_method_std,
        perform_initialization=False,  # initialize_by_name fills every weight
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        calculate_per_token_loss=True,
        cross_attention_layers=list(t.cross_attention_layers),
        visual_hidden_size=family(cfg).visual_width(cfg),
        **x.core_fields(),
    )


@dataclass
class TrainState:
    """What the training loop works with."""

    config: CrossAttentionTransformerConfig
    pg: ProcessGroupCollection
    model: DistributedDataParallel
    stage: VisionLanguageModel  # this rank's unwrapped model stage (any family), for shapes and checkpoints
    optimizer: object
    scheduler: OptimizerParamScheduler
    device: torch.device


def text_settings(cfg: RunConfig, vocab_size: int) -> TextSettings:
    """The decoder's vocabulary and RoPE settings from the run config."""
    return from_section(TextSettings, cfg.model.text, vocab_size=vocab_size)


def build_model(cfg: RunConfig, vocab_size: int, pg: ProcessGroupCollection, device: torch.device):
    """This pipeline stage's model, initialised by name (same weights in every layout)."""
    config = transformer_config(cfg)
    text = text_settings(cfg, vocab_size)
    pp_rank, pp = pg.pp.rank(), pg.pp.size()
    # Megatron-LM's seeding: the model-parallel RNG tracker (TP-distinct dropout streams).
    torch.manual_seed(cfg.training.seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(cfg.training.seed)
    m = cfg.model
    parts = StageParts(
        config,
        text,
        pg,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        freeze_vision_encoder=m.freeze_vision_encoder,
        vision_activation_checkpointing=m.vision.activation_checkpointing,
    )
    model = family(cfg).build(cfg, parts)
    initialize_by_name(model, cfg.training.seed)
    model.model_type = ModelType.encoder_or_decoder
    model = model.to(device)
    mark_cpu_parameters(model)
    return config, model


def build_train_state(cfg: RunConfig, vocab_size: int, device: torch.device) -> TrainState:
    """Groups, model (DDP-wrapped), optimizer and LR scheduler."""
    pg = init_model_parallel(cfg)
    config, stage = build_model(cfg, vocab_size, pg, device)
    module = Float16Module(config, stage) if config.bf16 else stage
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config, ddp_config, module)
    tr = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=tr.lr,
        min_lr=tr.min_lr,
        weight_decay=tr.weight_decay,
        adam_beta1=tr.adam_beta1,
        adam_beta2=tr.adam_beta2,
        clip_grad=tr.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=tr.lr_warmup_iters,
        lr_decay_steps=tr.train_iters,
        lr_decay_style=tr.lr_decay_style,
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=tr.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=cfg.checkpoint.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.checkpoint.override_opt_param_scheduler,
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return TrainState(config, pg, model, stage, optimizer, scheduler, device)
