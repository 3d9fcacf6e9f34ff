"""The next token from the logits (greedy, temperature, top-p), the same on every rank of a model replica."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        temperature: 0 picks the arg-max (greedy); above 0 the logits are divided by it before the softmax.
        top_p: nucleus sampling: draw only among the most probable tokens whose probabilities first
            reach ``top_p`` (1: all tokens). Ignored when greedy.
        seed: seeds the draws (the same stream on every rank).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether the next token is the arg-max."""
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator:
        """A fresh random stream for one generation."""
        return torch.Generator(device=device).manual_seed(self.seed)


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> Tensor:
    """``[B]`` token ids from ``[B, V]`` logits (the whole vocabulary)."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p: the most probable one always stays.
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def agree(tokens: Tensor, pg: ProcessGroupCollection) -> Tensor:
    """Rank 0's ``tokens`` of this model replica (its TP x CP group) on every rank of it.

    Each CP rank merges the visual shards' partial attentions in its own order, so logits may differ
    in the last bits between ranks; the ranks must still feed the same token back.
    """
    for group in (pg.tp, pg.cp):  # (t, c) takes (0, c)'s, then (t, 0)'s, which is now (0, 0)'s
        if group.size() > 1:
            dist.broadcast(tokens, group=group, group_src=0)
    return tokens
