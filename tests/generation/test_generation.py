"""KV-cached generation: the tokens of a full recompute, in every TP/CP layout, for all three families.

Each strategy of the ops, given the same query rows on every CP rank (generation replicates the
text), returns on every rank the exact attention of those rows against all visual shards.

Tiny models of mllama, OpenFlamingo and mPLUG-Owl3 (wide random weights, open gates, fp32) answer
three left-padded prompts about generated clips. The KV-cached tokens equal greedy decoding that
reruns the whole forward for each prompt alone at every step; CP 2, CP 3 (a rank without frames)
and TP 2 give the single-process tokens, greedy and sampled; blanking the frames changes the answer.
"""

import pytest
import torch
from generation_harness import CONFIGS, NEW_TOKENS, cached_and_recomputed, cached_in_layouts

from lvx_megatron.generation import Sampling, generate
from lvx_megatron.generation.decoder import text_attention_mask
from lvx_megatron.generation.sampling import choose
from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.registry import STRATEGIES

PROMPTS = 3
LAYOUTS = {2: [(1, 2), (2, 1)], 3: [(1, 3)]}  # world size -> (TP, CP) layouts


@pytest.fixture(scope="module")
def single() -> dict:
    return spawn_gloo(1, cached_and_recomputed, PROMPTS)[0]


@pytest.fixture(scope="module")
def layouts() -> dict:
    results = {}
    for world_size, layouts in LAYOUTS.items():
        ranks = spawn_gloo(world_size, cached_in_layouts, PROMPTS, layouts)
        replicated = [r.pop("replicated queries") for r in ranks]
        assert all(r == ranks[0] for r in ranks)  # every rank of a replica returns the same tokens
        results |= ranks[0] | {("replicated queries", world_size): replicated}
    return results


def test_replicated_queries_get_the_exact_attention_on_every_rank(layouts):
    """Generation passes the same text rows on every CP rank: whatever the strategy, each rank's
    output is the attention of those rows against all visual shards (float64)."""
    for world_size in LAYOUTS:
        for errors in layouts[("replicated queries", world_size)]:
            assert len(errors) == 2 * len(STRATEGIES)
            assert max(errors.values()) < 1e-12, (world_size, errors)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kv_cached_tokens_equal_full_recompute(single, arch):
    result = single[arch]
    assert len(set(result["lengths"])) > 1  # the prompts are left-padded
    assert result["cached"] == result["recomputed"]
    assert all(len(tokens) == NEW_TOKENS for tokens in result["cached"])
    assert len({tuple(t) for t in result["cached"]}) > 1  # the answers depend on the prompt
    assert result["blanked"] != result["cached"]  # and on the frames


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_layout_gives_the_single_process_tokens(single, layouts, arch):
    for tp, cp in [layout for group in LAYOUTS.values() for layout in group]:
        assert layouts[(tp, cp, arch)]["cached"] == single[arch]["cached"], (tp, cp)
        assert layouts[(tp, cp, arch)]["sampled"] == single[arch]["sampled"], (tp, cp)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert choose(logits, Sampling(), torch.Generator()).tolist() == [1, 0]
    # top_p below the first token's probability keeps only the arg-max
    narrow = Sampling(temperature=1.0, top_p=0.01, seed=3)
    assert choose(logits, narrow, narrow.generator(torch.device("cpu"))).tolist() == [1, 0]
    wide = Sampling(temperature=5.0, top_p=1.0, seed=3)
    draws = {tuple(choose(logits, wide, wide.generator(torch.device("cpu"))).tolist()) for _ in range(3)}
    assert len(draws) == 1  # seeded: the same draw each time
    # padding keys are masked (True), except for the padding row itself; causality is megatron's
    mask = text_attention_mask(torch.tensor([[False, True, True]]), 3)[0, 0]
    assert mask.tolist() == [[False, False, False], [True, False, False], [True, False, False]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_sampling_errors_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.parametrize(
    "tokens, mask, steps, message",
    [
        (torch.zeros(2, 3), None, 4, r"prompt_tokens must be an int64 tensor \[B, S\]"),
        (torch.zeros(2, 3, dtype=torch.long), None, 0, "max_new_tokens must be a positive int"),
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[True, True, False]]), 4, "left padding only"),
        (torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), 4, "prompt_mask must be a bool"),
    ],
)
def test_generate_errors_name_the_argument(tokens, mask, steps, message):
    with pytest.raises(ValueError, match=message):
        generate(None, tokens, {}, steps, prompt_mask=mask)
