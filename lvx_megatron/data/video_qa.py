"""Procedurally generated video question answering: coloured shapes on a plain background.

Every sample is a pure function of ``(seed, split, index)``. The questions need several frames but not
their order: the model (Llama-3.2-Vision style) encodes every frame on its own and its text cross-attends
to the unordered set of all frames' tokens, so it has no frame-order signal. Every answer is a function
of the SET of frames:

* ``count`` -- "in how many frames is the red square?" -> few / half / many / all (a quarter, half,
  three quarters or all of the frames)
* ``most``  -- "which colour is in the most frames?" -> one of the five colours
* ``seen``  -- "does any frame show red?" -> yes / no (when yes, in one frame only: a needle
  in the video; three objects either way)

Objects come and go between frames (they are shown in random subsets of them) and sit still. (A
question about motion, whether an object moves, is not among them: the demo's 0.3M-parameter model
did not learn it within its budget, 0.58-0.61 against 0.5 chance in three trials.) Answers are
uniform within each question type and the question text carries no hint of the answer, so a model
that ignores the frames scores at best :func:`chance_accuracy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (30, 30, 30)

COUNTS: tuple[str, ...] = ("few", "half", "many", "all")  # a quarter, 2/4, 3/4, all of the frames
# Question type -> (sampling weight, possible answers, question template). Equal weights: the demo
# reports the accuracy of every type.
QUESTION_TYPES: dict[str, tuple[float, tuple[str, ...], str]] = {
    "count": (1.0, COUNTS, "in how many frames is the {color} {shape}?"),
    "most": (1.0, tuple(COLORS), "which colour is in the most frames?"),
    "seen": (1.0, ("yes", "no"), "does any frame show {color}?"),
}
SPLITS: dict[str, int] = {"train": 0, "eval": 1}
# Bump whenever the samples a (seed, split, index) produces change: generated copies are remade.
GENERATOR_VERSION = 3


def vocabulary() -> list[str]:
    """All words/punctuation the generator can emit (questions and answers), sorted."""
    words: set[str] = set(COLORS) | set(SHAPES)
    for _, answers, template in QUESTION_TYPES.values():
        words |= set(answers)
        text = template.replace("?", " ?")
        words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


def chance_by_type() -> dict[str, float]:
    """Per question type, the best accuracy without the frames: ``max_a P(a | t)`` (answers are uniform)."""
    return {t: 1.0 / len(answers) for t, (_, answers, _) in QUESTION_TYPES.items()}


def chance_accuracy() -> float:
    """Best accuracy without looking at the frames: per question type, always answer the most likely answer.

    The question text reveals the type (and nothing more), so this is ``sum_t weight_t * max_a P(a | t)``:
    with equal weights ``(1/4 + 1/5 + 1/2) / 3 = 0.317``.
    """
    total = sum(w for w, _, _ in QUESTION_TYPES.values())
    chance = chance_by_type()
    return sum(w * chance[t] for t, (w, _, _) in QUESTION_TYPES.items()) / total


@dataclass(frozen=True)
class ShapeTrack:
    """One object: its look, its centre (pixels; objects sit still) and the frames it is shown in
    (None: all)."""

    color: str
    shape: str
    x: float
    y: float
    shown: frozenset[int] | None = None


@dataclass(frozen=True)
class ScenePlan:
    """Everything but the pixels: the objects (drawn in order, last on top), the question and answer."""

    qtype: str
    question: str
    answer: str
    tracks: tuple[ShapeTrack, ...]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape of half-extent ``r`` centred at (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.85 * r  # same area order as the circle so size does not give the shape away
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":  # apex up, base at cy + r
        frac = (yy - (cy - r)) / (2 * r)
        return (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * r)
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


class VideoQAGenerator:
    """Deterministic synthetic video QA samples.

    ``generator[i]`` -> ``{"frames": uint8 [F, P, P, 3], "question": str, "answer": str}``. Train and eval
    use different random streams (``split``), so they never share a sample stream.
    """

    def __init__(
        self, num_samples: int, num_frames: int = 8, frame_size: int = 64, seed: int = 0, split: str = "train"
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if num_frames < 4:  # the four counts (a quarter .. all of the frames) must differ
            raise ValueError(f"num_frames must be >= 4, got {num_frames}")
        if frame_size < 16:
            raise ValueError(f"frame_size must be >= 16 pixels, got {frame_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.seed = seed
        self.split = split
        self._qtypes = list(QUESTION_TYPES)
        weights = np.array([QUESTION_TYPES[t][0] for t in self._qtypes], dtype=np.float64)
        self._qprobs = weights / weights.sum()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        plan = self.plan(index)
        return {"frames": self.render(plan), "question": plan.question, "answer": plan.answer, "qtype": plan.qtype}

    def __iter__(self):
        for i in range(self.num_samples):
            yield self[i]

    # --- scene planning (cheap, no pixels) ---------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    @property
    def radius(self) -> float:
        # Big shapes: a third of the frame wide.
        return self.frame_size / 6.0

    def _pick_objects(self, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
        # Colours are distinct within a scene so "the red square" is unambiguous and colour masks isolate objects.
        colors = rng.choice(list(COLORS), size=n, replace=False)
        shapes = rng.choice(SHAPES, size=n, replace=True)
        return [(str(c), str(s)) for c, s in zip(colors, shapes, strict=True)]

    def count_frames(self, answer: str) -> int:
        """Frames that show an object of count ``answer`` (a quarter, half, 3/4 or all of them)."""
        return round(self.num_frames * (COUNTS.index(answer) + 1) / len(COUNTS))

    def _spots(self, rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
        """``n`` random centres, two radii apart so no object covers another; where that does not fit
        (small frames), one radius apart, so every object stays partly visible.

        Spots are placed one by one; a layout whose first spots leave no room starts over.
        """
        r, p = self.radius, self.frame_size
        for spacing in (2.0 * r, r):
            spots: list[tuple[float, float]] = []
            for attempt in range(1000):
                if attempt % 50 == 0:
                    spots = []
                x, y = rng.uniform(r + 1.0, p - r - 1.0, size=2)
                if all(math.hypot(x - a, y - b) > spacing for a, b in spots):
                    spots.append((float(x), float(y)))
                    if len(spots) == n:
                        return spots
        raise ValueError(f"no room for {n} shapes of radius {r:.1f} in a {p}-pixel frame")

    def _colour_tracks(self, rng: np.random.Generator, colors: list[str], counts: list[int]) -> list[ShapeTrack]:
        """Still objects of the given colours (random shapes, apart) shown in ``counts`` random frames."""
        shapes = rng.choice(SHAPES, size=len(colors), replace=True)
        return [
            ShapeTrack(c, str(sh), x, y, self._subset(rng, k))
            for c, sh, (x, y), k in zip(colors, shapes, self._spots(rng, len(colors)), counts, strict=True)
        ]

    def _subset(self, rng: np.random.Generator, k: int) -> frozenset[int]:
        return frozenset(int(t) for t in rng.choice(self.num_frames, size=k, replace=False))

    def plan(self, index: int) -> ScenePlan:
        """The scene and question of sample ``index`` (no rendering)."""
        rng = self._rng(index)
        qtype = self._qtypes[int(rng.choice(len(self._qtypes), p=self._qprobs))]
        _, answers, template = QUESTION_TYPES[qtype]
        answer = str(answers[int(rng.integers(len(answers)))])  # uniform answers within a type
        f = self.num_frames
        if qtype == "count":  # the target in a quarter .. all of the frames, another object in every frame
            objs = self._pick_objects(rng, 2)
            (tx, ty), (ox, oy) = self._spots(rng, 2)
            tracks = [
                ShapeTrack(*objs[0], tx, ty, self._subset(rng, self.count_frames(answer))),
                ShapeTrack(*objs[1], ox, oy),
            ]
            question = template.format(color=objs[0][0], shape=objs[0][1])
        elif qtype == "most":  # three colours in clearly different numbers of frames; the answer's the most
            others = [str(c) for c in rng.choice([c for c in COLORS if c != answer], size=2, replace=False)]
            gap = max(1, f // 4)
            low = int(rng.integers(1, f - 2 * gap + 1))
            counts = [low + 2 * gap + int(rng.integers(0, f - low - 2 * gap + 1)), low + gap, low]
            tracks = self._colour_tracks(rng, [answer, *others], counts)
            question = template
        else:  # seen: the colour asked about in one frame (yes) or in none (no), among three objects
            colors = [str(c) for c in rng.choice(list(COLORS), size=4, replace=False)]
            counts = rng.integers(1, f + 1, size=3).tolist()
            if answer == "yes":
                counts[0] = 1
            tracks = self._colour_tracks(rng, colors[:3] if answer == "yes" else colors[1:], counts)
            question = template.format(color=colors[0])
        return ScenePlan(qtype, question, answer, tuple(tracks))

    # --- rendering ---------------------------------------------------------------------------------------
    def render(self, plan: ScenePlan) -> np.ndarray:
        """uint8 [F, P, P, 3] frames of a plan; later tracks are drawn on top."""
        f, p = self.num_frames, self.frame_size
        frames = np.empty((f, p, p, 3), dtype=np.uint8)
        frames[:] = np.array(BACKGROUND, dtype=np.uint8)
        for t in range(f):
            for tr in plan.tracks:
                if tr.shown is not None and t not in tr.shown:
                    continue
                frames[t][_shape_mask(tr.shape, tr.x, tr.y, self.radius, p)] = COLORS[tr.color]
        return frames
