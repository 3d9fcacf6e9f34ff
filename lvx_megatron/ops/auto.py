"""``strategy="auto"``: the cost model's choice for one call, from its shapes and the group's links."""

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .api import prepare_call
from .cost_model import CallShape, ComputeModel, Link, Prediction, Topology, choose_strategy
from .groups import HierarchicalGroups
from .mask_plan import MaskPlan

# Measured on an H100 by tools/bench_block_attention.py (GQA 32/8, d 128): the "auto" block backend on
# unmasked blocks and the Triton kernels on masked ones (what backend="auto" runs for each).
_BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "block_attention_h100.json"
# Without a measurement: a CUDA GPU's attention rate, a CPU core's.
_FALLBACK_RATE = {"cuda": (300e12, 250e12), "cpu": (20e9, 15e9)}
# Links by process-group backend: NCCL inside a node (NVLink) and gloo over TCP.
DEFAULT_LINKS = {"nccl": Link(bandwidth=100e9, latency=10e-6), "gloo": Link(bandwidth=1e9, latency=50e-6)}


def default_compute_model(device: torch.device, masked: bool) -> ComputeModel:
    """The measured H100 table on CUDA (masked blocks run on their own kernels), else a flat rate."""
    if device.type == "cuda" and _BENCHMARK.is_file():
        return ComputeModel.from_benchmark(_BENCHMARK, "triton/masked" if masked else "auto")
    return ComputeModel(default=_FALLBACK_RATE.get(device.type, _FALLBACK_RATE["cpu"]))


def default_link(group: dist.ProcessGroup | None) -> Link:
    backend = dist.get_backend(group) if dist.is_available() and dist.is_initialized() else "gloo"
    return DEFAULT_LINKS.get(str(backend), DEFAULT_LINKS["gloo"])


def choose_for_call(
    q: Tensor,
    kv_shape: tuple[int, int, int, int],
    *,
    group: dist.ProcessGroup | HierarchicalGroups | None = None,
    mask_plan: MaskPlan | None = None,
    link: Link | Topology | None = None,
    compute: ComputeModel | None = None,
    head_chunks: int | None = None,
) -> tuple[str, dict[str, Prediction]]:
    """The fastest predicted strategy for a call with these queries and K/V shape (collective).

    Every rank of ``group`` must call it; they exchange shard lengths and reach the same choice.
    ``link``: the group's link (None: by backend), or a :class:`~.cost_model.Topology`, which
    makes ``"hierarchical"`` a candidate. ``head_chunks`` as in ``distributed_cross_attention``.
    """
    k = q.new_empty(()).expand(kv_shape)  # only the shape travels
    p = prepare_call(q, k, k, group=group, mask_plan=mask_plan, head_chunks=head_chunks)
    shape = CallShape(
        q_lens=tuple(p.layout.q_lens),
        kv_lens=tuple(p.layout.kv_lens),
        batch=p.batch,
        q_heads=p.q_heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        elem_bytes=q.element_size(),
        acc_bytes=torch.empty((), dtype=p.acc_dtype).element_size(),
        head_chunks=p.head_chunks,
    )
    masked = mask_plan is not None
    if link is None:
        link = default_link(group.parent if isinstance(group, HierarchicalGroups) else group)
    return choose_strategy(shape, link, compute or default_compute_model(q.device, masked))
