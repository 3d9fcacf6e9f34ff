"""One registry of strategies: what each declares, who reads it, and the ops policy of a layer
(``"auto"`` kept per layer, the shared groups/links cache, the visual K/V recompute entry)."""

import ast
import copy
import re
from pathlib import Path

import pytest
import torch

from lvx_megatron.ops import (
    AUTO,
    REGISTRY,
    STRATEGIES,
    TWO_LEVEL_STRATEGIES,
    CrossAttentionOp,
    LinkSettings,
    SharedComm,
    Strategy,
    auto,
    distributed_cross_attention,
    recomputed_kv_cross_attention,
)
from lvx_megatron.ops.auto import choose_strategy
from lvx_megatron.ops.cost_model import CallShape, ComputeModel, Link, Topology, uniform_lengths
from lvx_megatron.ops.settings import check_strategy_name

PACKAGE = Path(__file__).resolve().parents[2] / "lvx_megatron"
SHAPE = CallShape(uniform_lengths(96, 4), uniform_lengths(4096, 4), batch=1, q_heads=8, kv_heads=2, head_dim=64)
FLAT = ComputeModel(flat=(1e12, 5e11))


def test_every_strategy_declares_its_passes_costs_and_group():
    assert set(REGISTRY) == set(STRATEGIES) | set(TWO_LEVEL_STRATEGIES) and not set(STRATEGIES) & set(
        TWO_LEVEL_STRATEGIES
    )
    assert AUTO not in REGISTRY
    for name, s in REGISTRY.items():
        assert isinstance(s, Strategy) and s.name == name
        assert all(callable(f) for f in (s.forward, s.backward, s.predicted_bytes, s.predicted_seconds))
        ranks_per_node = 2 if s.two_level else None
        fwd, bwd = s.predicted_bytes(SHAPE, 0, ranks_per_node)
        assert fwd > 0 and bwd > 0 and (fwd, bwd) == auto.predicted_bytes(name, SHAPE, 0, ranks_per_node)


def test_the_cost_model_predicts_every_registered_strategy():
    _, flat = choose_strategy(SHAPE, Link(1e9), FLAT)
    assert list(flat) == list(STRATEGIES)
    _, two_level = choose_strategy(SHAPE, Topology(2, Link(1e11), Link(1e9)), FLAT)
    assert list(two_level) == list(REGISTRY)
    with pytest.raises(ValueError, match=r"strategy must be one of \['query_ring', 'kv_ring'"):
        auto.predicted_bytes("ulysses", SHAPE, 0)


def test_validation_names_the_field_and_the_registered_values():
    for name in (AUTO, *STRATEGIES):
        check_strategy_name(name, "f", None, "rpn")
    for name in TWO_LEVEL_STRATEGIES:
        check_strategy_name(name, "f", 2, "rpn")
        with pytest.raises(ValueError, match=f"f '{name}' needs rpn"):
            check_strategy_name(name, "f", None, "rpn")
    with pytest.raises(ValueError, match=re.escape(f"f must be 'auto' or one of {sorted(STRATEGIES)}")):
        check_strategy_name("ulysses", "f", None, "rpn")


def test_strategy_names_are_spelled_only_in_ops():
    """core/, models/ and training/ read the registry: a strategy's name as a string in their code
    (docstrings and comments aside) would be a second home for it."""
    for layer in ("core", "models", "training"):
        for path in (PACKAGE / layer).rglob("*.py"):
            strings = [
                node.value
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            ]
            assert not set(strings) & set(REGISTRY), (path, sorted(set(strings) & set(REGISTRY)))


def _projection(dim: int, heads: int, head_dim: int):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(dim, 2 * heads * head_dim, dtype=torch.float64) / dim**0.5)

    def project(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (x @ weight).unflatten(-1, (heads, 2 * head_dim)).split(head_dim, dim=-1)
        return k, v

    return weight, project


def test_recomputed_kv_gives_the_gradients_of_the_kept_kv():
    weight, project = _projection(12, 2, 8)
    q = torch.randn(2, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (False, True):
        if recompute:
            out = recomputed_kv_cross_attention(q, x, project, backend="torch")
        else:
            out = distributed_cross_attention(q, *project(x), backend="torch")
        out.square().sum().backward()
        grads.append([t.grad.clone() for t in (q, x, weight)])
        for t in (q, x, weight):
            t.grad = None
    for kept, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, kept, rtol=1e-12, atol=1e-12)


def test_the_op_chooses_auto_once_and_keeps_it():
    _, project = _projection(12, 2, 8)
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64)
    x = torch.randn(1, 7, 12, dtype=torch.float64)
    op = CrossAttentionOp(AUTO, LinkSettings(), SharedComm())
    ref = distributed_cross_attention(q, *project(x), backend="torch")
    for _ in range(2):
        out = op(q, x, project, (1, 7, 2, 8), group=None, backend="torch")
        assert op.strategy in STRATEGIES
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match=r"strategy must be 'auto' or one of"):
        CrossAttentionOp("ulysses", LinkSettings(), SharedComm())
    for name in TWO_LEVEL_STRATEGIES:
        with pytest.raises(ValueError, match=f"strategy '{name}' needs links.ranks_per_node"):
            CrossAttentionOp(name, LinkSettings(), SharedComm())
    with pytest.raises(ValueError, match=r"source must be one of \['config', 'probe'\], got 'measure'"):
        LinkSettings(source="measure")


def test_the_shared_cache_is_owned_not_copied():
    shared = SharedComm()
    shared.probed_links[(None, None)] = Link(1e9)
    assert copy.deepcopy(shared) is shared and copy.copy({"s": shared})["s"] is shared
    assert SharedComm().probed_links == {}  # a new owner starts empty
