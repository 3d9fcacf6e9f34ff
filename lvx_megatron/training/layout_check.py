"""Check a run's parallel layout against the model and the world size before any heavy work.

A layout that cannot work (heads not divisible by TP, layers by PP, a global batch that does not
split into micro-batches per data-parallel rank, ...) should fail in the first second of a job, with
the flag to change, not after dataset generation, model construction or a queue wait.
"""

from dataclasses import dataclass

from .config import ConfigError, RunConfig
from .families import family

_FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "mbs": "--micro-batch-size",
    "gbs": "--global-batch-size",
}


@dataclass(frozen=True)
class Layout:
    """The sizes of a run's process grid."""

    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def _fail(flag_key: str, field: str, message: str) -> None:
    raise ConfigError(f"config error: {_FLAGS[flag_key]} ({field}): {message}")


def validate_layout(cfg: RunConfig, world_size: int) -> Layout:
    """The layout of ``cfg`` on ``world_size`` processes; ConfigError naming the flag if it cannot run."""
    p, t, v, tr, d = cfg.parallel, cfg.model.text, cfg.model.vision, cfg.training, cfg.data
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        _fail(
            "tp",
            "parallel",
            f"TP {tp} x PP {pp} x CP {cp} = {model_parallel} must divide the number of processes ({world_size})",
        )
    tp_divides = {
        "num_attention_heads": t.num_attention_heads,
        "num_query_groups": t.num_query_groups or t.num_attention_heads,
        "ffn_hidden_size": t.ffn_hidden_size,
        "make_vocab_size_divisible_by": t.make_vocab_size_divisible_by,
    }
    tp_divides = {f"model.text.{name}": value for name, value in tp_divides.items()} | family(cfg).tp_divides(cfg)
    for name, value in tp_divides.items():
        if value % tp:
            _fail("tp", "parallel.tensor_model_parallel_size", f"{tp} must divide {name} ({value})")
    if t.num_layers % pp:
        _fail("pp", "parallel.pipeline_model_parallel_size", f"{pp} must divide model.text.num_layers ({t.num_layers})")
    per_node = cfg.model.cross_attention.ranks_per_node
    if per_node is not None and cp % per_node:
        _fail(
            "cp",
            "model.cross_attention.ranks_per_node",
            f"{per_node} must divide parallel.context_parallel_size ({cp})",
        )
    sp = p.sequence_parallel and tp > 1
    text_split = cp * (tp if sp else 1)
    if d.seq_length % text_split:
        what = f"CP {cp} x TP {tp} (sequence parallel)" if sp else f"CP {cp}"
        _fail("cp", "parallel.context_parallel_size", f"{what} must divide data.seq_length ({d.seq_length})")
    if v.hidden_size % v.attention_heads:
        raise ConfigError(
            f"config error: model.vision.attention_heads: {v.attention_heads} must divide "
            f"model.vision.hidden_size ({v.hidden_size})"
        )
    dp = world_size // model_parallel
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        _fail(
            "gbs",
            "training.global_batch_size",
            f"{tr.global_batch_size} must be a multiple of micro batch size x data-parallel size "
            f"({tr.micro_batch_size} x {dp} = {tr.micro_batch_size * dp})",
        )
    return Layout(tp=tp, pp=pp, cp=cp, dp=dp)
