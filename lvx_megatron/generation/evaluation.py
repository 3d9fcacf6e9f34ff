"""Answer accuracy of a loaded checkpoint on held-out clips: generated answers beside teacher forcing.

Each clip is scored twice by the same model: the answer it *generates* (greedy, through the KV-cached
decoder) must equal the reference answer exactly (surrounding white space aside), and the answer
*teacher-forced* (one forward over question and reference answer) counts when every answer token
and the final eos is the arg-max, as the training loop's held-out ``accuracy`` counts it.
Data-parallel replicas (the processes beyond TP x CP) score disjoint shares of the clips.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from ..models.sharding import text_range
from ..training.data import collate_samples, unusable_reason
from ..training.families import family
from .loading import GenerationModel
from .loop import generate, model_inputs_on
from .prompt import answer_text, build_prompts

ALL = "all"  # the row of every scored clip


@dataclass
class TypeScore:
    """Counts of one question type (or :data:`ALL`)."""

    samples: int = 0
    generated_right: int = 0
    forced_right: int = 0

    def add(self, generated_right: bool, forced_right: bool) -> None:
        self.samples += 1
        self.generated_right += generated_right
        self.forced_right += forced_right

    @property
    def generated_accuracy(self) -> float:
        return self.generated_right / max(self.samples, 1)

    @property
    def forced_accuracy(self) -> float:
        return self.forced_right / max(self.samples, 1)


@dataclass
class Evaluation:
    """The scores per question type (``ALL`` first), clips skipped as unusable and examples of answers."""

    scores: dict[str, TypeScore]
    skipped: int
    examples: list[dict] = field(default_factory=list)


def exact_match(generated: str, reference: str) -> bool:
    """The generated answer is the reference, white space around either aside."""
    return generated.strip() == reference.strip()


@torch.no_grad()
def teacher_forced_right(loaded: GenerationModel, samples: Sequence[dict]) -> Tensor:
    """``[B]`` bool: every answer token (and the eos) of each sample is the model's arg-max given the
    reference before it; collective over the model's TP x CP group."""
    model, cfg = loaded.model, loaded.cfg
    batch = collate_samples(cfg, loaded.tokenizer, list(samples), [])
    inputs = model_inputs_on(model, {k: batch[k] for k in family(cfg).model_inputs})
    _, correct = model(**inputs)  # [B, S_local] on this CP rank's text rows
    cp = model.pg_collection.cp
    start, stop = text_range(batch["tokens"].shape[1], cp.size(), cp.rank())
    answer_rows = batch["loss_mask"][:, start:stop].to(correct.device) > 0
    wrong = ((~correct) & answer_rows).sum(dim=1)
    if cp.size() > 1:  # an answer may span CP ranks
        dist.all_reduce(wrong, group=cp)
    return wrong == 0


def _replica_share(count: int) -> range:
    """The clip indices this data-parallel replica scores."""
    return range(parallel_state.get_data_parallel_rank(), count, parallel_state.get_data_parallel_world_size())


def _sum_over_replicas(scores: dict[str, TypeScore], skipped: int, device: torch.device) -> tuple[dict, int]:
    """Every replica's counts added up (one rank of each replica contributes); the same on every rank."""
    names = sorted(scores)
    counts = torch.zeros(3 * len(names) + 1, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0:
        for i, name in enumerate(names):
            s = scores[name]
            counts[3 * i : 3 * i + 3] = torch.tensor([s.samples, s.generated_right, s.forced_right])
        counts[-1] = skipped
    dist.all_reduce(counts)
    values = [int(v) for v in counts.tolist()]
    total = {name: TypeScore(*values[3 * i : 3 * i + 3]) for i, name in enumerate(names)}
    return total, values[-1]


def evaluate_answers(
    loaded: GenerationModel,
    dataset: Sequence[dict],
    question_types: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    limit: int | None = None,
    progress: Callable[[int, int, TypeScore], None] | None = None,
    num_examples: int = 5,
) -> Evaluation:
    """Score the first ``limit`` clips of ``dataset`` (all by default); collective over the world.

    Args:
        loaded: the model, config and tokenizer (:func:`~.loading.load_for_generation`).
        dataset: indexable samples ``{"frames", "question", "answer", "qtype"?}``.
        question_types: the types the data names (each gets a row; clips of other types count in ``ALL``).
        batch_size: clips per generation batch (left-padded prompts).
        max_new_tokens: the longest generated answer.
        progress: called on every rank after each batch with (clips done by this replica, its share, its ``ALL``).
        num_examples: how many (question, reference, generated) triples the result keeps.
    """
    tokenizer = loaded.tokenizer
    share = _replica_share(min(limit or len(dataset), len(dataset)))
    types = {t: TypeScore() for t in question_types}
    scores = {ALL: TypeScore(), **types}
    skipped, examples = 0, []
    for first in range(0, len(share), batch_size):
        batch = []
        for i in share[first : first + batch_size]:
            sample = dataset[i]
            if unusable_reason(loaded.cfg, tokenizer, sample):
                skipped += 1
            else:
                batch.append(sample)
        if batch:
            prompts = build_prompts(loaded.cfg, tokenizer, batch)
            generated = generate(
                loaded.model,
                prompts.tokens,
                prompts.images,
                max_new_tokens,
                eos_id=tokenizer.eos_id,
                prompt_mask=prompts.prompt_mask,
            )
            forced = teacher_forced_right(loaded, batch).tolist()
            for sample, ids, forced_ok in zip(batch, generated, forced, strict=True):
                text = answer_text(tokenizer, ids)
                right = exact_match(text, sample["answer"])
                for name in (ALL, sample.get("qtype")):
                    if name in scores:
                        scores[name].add(right, forced_ok)
                if len(examples) < num_examples:
                    examples.append({"question": sample["question"], "answer": sample["answer"], "generated": text})
        if progress is not None:
            progress(min(first + batch_size, len(share)), len(share), scores[ALL])
    device = loaded.model.embedding.word_embeddings.weight.device
    total, skipped = _sum_over_replicas(scores, skipped, device if device.type == "cuda" else torch.device("cpu"))
    return Evaluation(total, skipped, examples)


class ProgressLine:
    """Prints ``clips done/share, accuracies, ETA`` every ``every_s`` seconds (when ``enabled``)."""

    def __init__(self, enabled: bool, every_s: float = 10.0) -> None:
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, share: int, score: TypeScore) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and done < share):
            return
        self.last = now
        eta = (now - self.start) / max(done, 1) * (share - done)
        print(
            f"[evaluate] {done}/{share} clips of this replica | generated exact match {score.generated_accuracy:.3f} "
            f"| teacher-forced {score.forced_accuracy:.3f} | ETA {eta:.0f}s",
            flush=True,
        )
