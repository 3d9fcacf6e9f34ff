"""The run configuration: a YAML file validated by pydantic, then command-line overrides.

Unknown keys are errors (a typo must not silently fall back to a default), and every error is
one line naming the field, e.g. ``config error: model.text.hidden_size: Input should be greater
than 0 (got -4)``.
"""

import dataclasses
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..core.transformer_config import SECTION_FIELDS, CrossAttentionTransformerConfig
from ..ops import SettingError, SettingFields, check_cross_attention_settings


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the field."""


class FieldError(ValueError):
    """A section validator's complaint about ``field`` (dotted, relative to the section).

    The one-line message appends ``field`` to the section's location, so every check that spans
    several fields still names the one to change: ``config error: model.vision.patch_size: ...``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextModelConfig(_Section):
    """The language decoder (Llama 3 style: RMSNorm, SwiGLU, RoPE, GQA; Qwen2: plus q/k/v biases;
    MPT's sizes with ``mlp: gelu``, a plain ``fc2(gelu(fc1(x)))`` MLP).

    ``cross_attention_layers`` are 0-based decoder indices: mllama's cross-attention layers,
    the layers OpenFlamingo puts a gated cross-attention block before, mPLUG-Owl3's hyper-attention
    layers. ``cross_attention_every_n_layers`` (OpenFlamingo's ``cross_attn_every_n_layers``) gives
    them as every layer ``i`` with ``(i + 1) % n == 0`` instead.
    """

    num_layers: PositiveInt
    hidden_size: PositiveInt
    ffn_hidden_size: PositiveInt
    num_attention_heads: PositiveInt
    num_query_groups: PositiveInt | None = None
    cross_attention_layers: list[int] = Field(min_length=1)
    cross_attention_every_n_layers: PositiveInt | None = None
    add_qkv_bias: bool = False
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    rotary_base: PositiveFloat = 500000.0
    rope_scaling: bool = False
    rope_scaling_factor: PositiveFloat = 8.0
    norm_epsilon: PositiveFloat = 1e-5
    init_method_std: PositiveFloat = 0.02
    make_vocab_size_divisible_by: PositiveInt = 128

    @model_validator(mode="before")
    @classmethod
    def _layers_from_every_n(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("cross_attention_every_n_layers") is None:
            return data
        if data.get("cross_attention_layers") is not None:
            raise ValueError("give cross_attention_layers or cross_attention_every_n_layers, not both")
        n, layers = data["cross_attention_every_n_layers"], data.get("num_layers")
        if isinstance(n, int) and isinstance(layers, int) and n >= 1:
            data = {**data, "cross_attention_layers": [i for i in range(layers) if (i + 1) % n == 0]}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TextModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise FieldError(
                "num_attention_heads",
                f"must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}",
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise FieldError(
                "num_query_groups", f"must divide num_attention_heads ({self.num_attention_heads}), got {groups}"
            )
        layers = self.cross_attention_layers
        problems = [f"{i} out of range" for i in sorted(set(layers)) if not 0 <= i < self.num_layers]
        problems += [f"{i} repeated" for i in sorted(set(layers)) if layers.count(i) > 1]
        if problems:
            raise FieldError(
                "cross_attention_layers",
                f"must be distinct decoder layer indices in [0, num_layers={self.num_layers}), "
                f"got {layers} ({', '.join(problems)})",
            )
        return self


class VisionModelConfig(_Section):
    """The vision encoder: mllama's (one tile = ``image_size`` x ``image_size`` pixels), or the
    CLIP (openflamingo) / SigLIP (mplug_owl3) ViT, one tile per image.

    ``num_global_layers`` and ``intermediate_layers_indices`` are mllama's, ``feature_layer`` the
    ViTs' (the hidden state used as features, HF's ``hidden_states[feature_layer]``).
    ``max_num_tiles`` (mllama 4, ViTs 1) and ``norm_eps`` (1e-5; SigLIP 1e-6) default by model family.
    """

    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_global_layers: int | None = Field(None, ge=0)
    attention_heads: PositiveInt
    intermediate_size: PositiveInt
    image_size: PositiveInt
    patch_size: PositiveInt
    max_num_tiles: PositiveInt = 4
    intermediate_layers_indices: list[int] = Field(default_factory=list)
    feature_layer: int = Field(-1, le=-1)
    norm_eps: PositiveFloat = 1e-5
    activation_checkpointing: bool = False


# How ``model`` names the settings the ops check (lvx_megatron.ops.settings): the fields an error is
# raised on relative to the section, the others (named in messages only) in full.
_SECTION_SETTING_FIELDS = SettingFields(
    strategy="cross_attention.strategy",
    backend="cross_attention.backend",
    ranks_per_node="model.cross_attention.ranks_per_node",
    layers="model.text.cross_attention_layers",
)


class _ModelCrossAttentionSettings(_Section):
    """``model.cross_attention`` without the core config's settings (added by :data:`CrossAttentionSettings`):
    what the model builders read (``heads``, ``head_dim``, ``ff_mult``: OpenFlamingo's gated blocks,
    8, 64, 4, whatever the decoder's width), and their hand-over (:class:`ModelConfig` checks them with
    the decoder's layers)."""

    heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    ff_mult: PositiveInt | None = None
    # Text tokens that see no image: "zero" output (Meta's reference) or "attend_all" visual tokens
    # (Hugging Face's MllamaForConditionalGeneration; set by tools/convert_hf_checkpoint.py for parity).
    blind_rows: Literal["zero", "attend_all"] = "zero"

    def core_fields(self) -> dict[str, Any]:
        """The core config's fields these settings are (``CrossAttentionTransformerConfig(**...)``)."""
        return {core: getattr(self, name) for name, core in SECTION_FIELDS.items()}


def from_section[T](target: type[T], section: BaseModel, **given: Any) -> T:
    """The dataclass ``target`` with ``given``, and for its other fields the section's settings of the
    same name (a field the section lacks keeps its default)."""
    names = [f.name for f in dataclasses.fields(target) if f.name not in given and f.name in type(section).model_fields]
    return target(**{name: getattr(section, name) for name in names}, **given)


def _core_setting(name: str) -> tuple[Any, Any]:
    """``(type, default)`` of section setting ``name``: its core config field's."""
    f = next(f for f in dataclasses.fields(CrossAttentionTransformerConfig) if f.name == SECTION_FIELDS[name])
    return f.type, f.default


# How the cross-attention layers run: the core config's settings (core.transformer_config.SECTION_FIELDS, each
# defined and documented there) and the model builders' own.
CrossAttentionSettings = create_model(
    "CrossAttentionSettings",
    __base__=_ModelCrossAttentionSettings,
    __doc__="The section ``model.cross_attention``: how the cross-attention layers run.",
    **{name: _core_setting(name) for name in SECTION_FIELDS},
)


class PerceiverSettings(_Section):
    """OpenFlamingo's Perceiver Resampler (its width is the vision tower's)."""

    num_latents: PositiveInt = 64
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    head_dim: PositiveInt = 64
    ff_mult: PositiveInt = 4
    max_num_media: PositiveInt | None = None  # media time embeddings (>= data.max_images); None: none
    max_num_frames: PositiveInt | None = None  # frame embeddings (one frame per medium here); None: none


class ModelConfig(_Section):
    """``architecture`` picks the model family (``training/families``); the sections that family does
    not use must be left out."""

    architecture: str = "mllama"
    text: TextModelConfig
    vision: VisionModelConfig
    cross_attention: CrossAttentionSettings = Field(default_factory=CrossAttentionSettings)
    perceiver: PerceiverSettings | None = None
    freeze_vision_encoder: bool = False

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        arch = data.get("architecture", "mllama")
        family = _families().get(arch) if isinstance(arch, str) else None
        return family.defaults(dict(data)) if family else data  # an unknown name: the field's error

    @field_validator("architecture", mode="before")
    @classmethod
    def _known_architecture(cls, name: Any) -> str:
        if not isinstance(name, str) or name not in _families():
            *others, last = [repr(n) for n in _families()]
            raise ValueError(f"Input should be {', '.join(others)} or {last}" if others else f"Input should be {last}")
        return name

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        x = self.cross_attention
        try:
            check_cross_attention_settings(
                x.strategy, x.backend, x.ranks_per_node, self.text.cross_attention_layers, _SECTION_SETTING_FIELDS
            )
        except SettingError as exc:
            raise FieldError(exc.field, exc.problem) from None
        _families()[self.architecture].check(self)
        return self


def _families() -> dict:
    """The registered model families, imported when first needed: each family's module imports this
    module's sections."""
    from .families import FAMILIES

    return FAMILIES


class DataConfig(_Section):
    """Where samples come from and how they become batches.

    ``kind: synthetic_video_qa`` generates the embedded moving-shapes dataset into ``path`` on
    first use; ``kind: shards`` reads WebDataset shards made by ``tools/folder_to_wds.py`` (``path``
    holds ``train/`` and ``eval/``); ``kind: video_jsonl`` decodes clips named by ``path/train.jsonl``
    and ``path/eval.jsonl``, ``max_images`` frames each (``frame_sampling: uniform``) or one every
    ``1/fps`` seconds (``frame_sampling: fps``); ``kind: energon`` reads a megatron-energon dataset
    (``path``: a prepared folder, e.g. from ``tools/video_jsonl_to_energon.py``, or a metadataset YAML
    blending several) with energon's loaders, decoding clips as ``video_jsonl`` does in
    ``num_workers`` worker processes; its loader state is saved in checkpoints.

    ``video_jsonl`` clip paths resolve inside ``path`` (symlinks followed): a line whose clip lies
    outside it (``../x.mp4``, an absolute path, a symlink pointing out) is a bad sample naming the
    line, unless ``allow_outside_paths`` is true.
    """

    kind: Literal["synthetic_video_qa", "shards", "video_jsonl", "energon"] = "synthetic_video_qa"
    path: str
    seq_length: PositiveInt
    max_images: PositiveInt
    train_samples: PositiveInt = 4096
    eval_samples: PositiveInt = 256
    frame_size: PositiveInt = 32
    tokenizer: Literal["words", "bytes", "huggingface"] = "words"
    tokenizer_path: str | None = None
    seed: int = 0
    max_bad_samples: int = Field(100, ge=0)  # unreadable/invalid samples skipped before the run aborts
    allow_outside_paths: bool = False  # video_jsonl: clips may lie outside path (see above)
    frame_sampling: Literal["uniform", "fps"] = "uniform"  # clips (video_jsonl, energon): how frames are picked
    fps: PositiveFloat | None = None  # clips with frame_sampling fps (a sample's own "fps" wins)
    # energon only: worker processes per rank that decode clips (0: in the loader thread), the sample
    # shuffle buffer and the longest run of consecutive samples read from one shard slice.
    num_workers: int = Field(2, ge=0)
    shuffle_buffer_size: PositiveInt = 100
    max_samples_per_sequence: PositiveInt = 100

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        # Only a value other than the default is an error: a checkpoint's saved run config (export,
        # resume) spells out every field, these included, whatever the kind.
        used_by = {
            ("video_jsonl", "energon"): (("frame_sampling", "uniform"), ("fps", None)),
            ("energon",): (("num_workers", 2), ("shuffle_buffer_size", 100), ("max_samples_per_sequence", 100)),
            ("video_jsonl",): (("allow_outside_paths", False),),
        }
        for kinds, fields in used_by.items():
            if self.kind in kinds:
                continue
            for field, default in fields:
                if getattr(self, field) != default:
                    kinds_text = " and ".join(map(repr, kinds))
                    raise FieldError(field, f"used by kind {kinds_text} only, got kind {self.kind!r}; leave it out")
        if self.frame_sampling == "fps" and self.fps is None:
            raise FieldError("fps", "required by frame_sampling 'fps' (frames per second to sample)")
        if self.frame_sampling == "uniform" and self.fps is not None:
            raise FieldError(
                "fps", "used by frame_sampling 'fps' only (frame_sampling is one of uniform, fps); leave it out"
            )
        if self.tokenizer == "huggingface" and not self.tokenizer_path:
            raise FieldError(
                "tokenizer_path",
                "required by tokenizer 'huggingface' (a local transformers tokenizer folder); "
                "the tokenizers without one: words, bytes",
            )
        return self


class ParallelConfig(_Section):
    tensor_model_parallel_size: PositiveInt = 1
    pipeline_model_parallel_size: PositiveInt = 1
    context_parallel_size: PositiveInt = 1
    sequence_parallel: bool = True  # used whenever tensor_model_parallel_size > 1
    use_distributed_optimizer: bool = True


class TrainingConfig(_Section):
    micro_batch_size: PositiveInt
    global_batch_size: PositiveInt
    train_iters: PositiveInt
    lr: float = Field(gt=0, allow_inf_nan=False)
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False)
    lr_warmup_iters: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    clip_grad: float = Field(1.0, ge=0)
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    log_interval: PositiveInt = 10
    eval_interval: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_iters: PositiveInt = 4
    exit_interval: int = Field(0, ge=0)  # stop (after saving) when iteration % exit_interval == 0
    max_skipped_steps: int = Field(10, ge=0)  # iterations with non-finite loss/grads skipped before stopping
    hang_timeout_s: float = Field(1800.0, ge=0)  # a loop phase without progress this long aborts (0: off)
    # Cross-attention's time share is measured on iterations that are multiples of this (0: never);
    # those steps synchronise the device and are left out of step_s, tokens/s and MFU.
    xattn_timing_interval: int = Field(50, ge=0)
    eval_without_vision: bool = False
    # torch.profiler over iterations profile_step_start+1 .. profile_step_end (Megatron-LM's numbering) on
    # profile_ranks: a trace and a time-per-phase table under <save or run_dir>/profile (training/profiling.py).
    profile: bool = False
    profile_step_start: int = Field(10, ge=0)
    profile_step_end: int = Field(12, ge=1)
    profile_ranks: list[int] = Field(default_factory=lambda: [0])

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if self.profile and not self.profile_step_start < self.profile_step_end <= self.train_iters:
            raise FieldError(
                "profile_step_end",
                f"must be > profile_step_start ({self.profile_step_start}) and <= train_iters "
                f"({self.train_iters}), got {self.profile_step_end}",
            )
        if any(r < 0 for r in self.profile_ranks):
            raise FieldError("profile_ranks", f"must be global ranks (>= 0), got {self.profile_ranks}")
        if self.lr_warmup_iters >= self.train_iters:
            raise FieldError(
                "lr_warmup_iters", f"must be < train_iters ({self.train_iters}), got {self.lr_warmup_iters}"
            )
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"must be <= lr ({self.lr}), got {self.min_lr}")
        if self.global_batch_size % self.micro_batch_size:
            raise FieldError(
                "global_batch_size",
                f"must be a multiple of micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}",
            )
        return self


class CheckpointConfig(_Section):
    """Where checkpoints go and come from. A resumed run whose LR schedule (``training.lr``, ``min_lr``,
    ``lr_warmup_iters``, ``lr_decay_style``, ``weight_decay``, ``train_iters``) differs from the checkpoint's
    is refused unless one of megatron's two choices is made: ``override_opt_param_scheduler`` (this run's
    values) or ``use_checkpoint_opt_param_scheduler`` (the checkpoint's)."""

    save: str | None = None
    load: str | None = None
    save_interval: int = Field(0, ge=0)  # 0: save only at the end (and on SIGTERM)
    keep_last: int = Field(0, ge=0)  # keep only the newest N checkpoints (0: keep all)
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CheckpointConfig":
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise FieldError(
                "use_checkpoint_opt_param_scheduler",
                "cannot be combined with override_opt_param_scheduler (this run's schedule or the checkpoint's: "
                "choose one)",
            )
        return self


class LoggingConfig(_Section):
    run_dir: str = "runs/default"  # metrics.jsonl goes here when checkpoint.save is unset
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class RunConfig(_Section):
    """Everything a run needs; the YAML file's top-level sections."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    training: TrainingConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def output_dir(self) -> Path:
        """Where metrics.jsonl and the W&B run live: the save dir, else the run dir."""
        return Path(self.checkpoint.save or self.logging.run_dir)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        loc.append(cause.field)
    loc = ".".join(loc) or "<top level>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see the config reference in docs/training.md)"
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {first['input']!r})"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"config error: {loc}: {msg}{more}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {key} is not a section")
    node[leaf] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the
    last one, so a second ``training:`` section would silently drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first at line {first_line[key]})", problem_mark=key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """``config error: FILE:LINE:COLUMN: not valid YAML: problem (context)``, 1-based like editors."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return ConfigError(f"config error: {where}: not valid YAML: {problem}")


BASE_KEY = "base"  # a config's base file: its settings, under this file's


def _merged(base: dict, child: dict) -> dict:
    """``child`` over ``base``: sections merge key by key, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The settings of ``path`` over those of its ``base:`` file (and so on up), as one tree."""
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of sections")
    if BASE_KEY not in tree:
        return tree
    name = tree.pop(BASE_KEY)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config error: {path}: {BASE_KEY}: must be a file path relative to this file, got {name!r}")
    base = (path.parent / name).resolve()
    if not base.is_file():
        raise ConfigError(f"config error: {path}: {BASE_KEY}: no such file {str(base)!r}")
    chain = (*chain, path.resolve())
    if base in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(base) :], base))
        raise ConfigError(f"config error: {path}: {BASE_KEY}: the bases form a cycle: {cycle}")
    return _merged(_read_tree(base, chain), tree)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate ``path`` (over its ``base:`` file, if it names one); ``overrides`` maps
    dotted field names to values that win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: --config: no such file {str(path)!r}")
    tree = _read_tree(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def config_yaml(cfg: RunConfig) -> str:
    """``cfg`` with every setting (defaults filled in, bases merged) as YAML that :func:`load_config` reads back."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
