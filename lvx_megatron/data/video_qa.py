"""Procedurally generated video question answering: coloured shapes moving on a plain background.

Every sample is a pure function of ``(seed, split, index)``. The questions need several frames but not
their order: the model (Llama-3.2-Vision style) encodes every frame on its own and its text cross-attends
to the unordered set of all frames' tokens, so it has no frame-order signal. Every answer is a function
of the SET of frames:

* ``motion`` -- "how does the red square move?" -> sideways / vertically / diagonally / still
* ``moving`` -- "which shape moves?" -> circle / square / triangle (one moves far, the others are static)
* ``speed``  -- "does the blue circle move faster or slower than the green square?" -> faster / slower

Answers are uniform within each question type and the question text carries no hint of the answer,
so a model that ignores the frames scores at best :func:`chance_accuracy`.
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
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x right, y down).
_DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS: tuple[str, ...] = ("sideways", "vertically", "diagonally", "still")
# Motion axis -> possible unit vectors (the sign is random: it only shows in the frame order).
_MOTION_VECTORS: dict[str, tuple[tuple[int, int], ...]] = {
    "sideways": ((1, 0), (-1, 0)),
    "vertically": ((0, 1), (0, -1)),
    "diagonally": ((1, 1), (1, -1), (-1, 1), (-1, -1)),
    "still": ((0, 0),),
}
BACKGROUND: tuple[int, int, int] = (30, 30, 30)

# Question type -> (sampling weight, possible answers, question template). Motion questions are the
# easiest (one far-moving target) and get the largest weight so a tiny model beats chance quickly.
QUESTION_TYPES: dict[str, tuple[float, tuple[str, ...], str]] = {
    "motion": (0.5, MOTIONS, "how does the {color} {shape} move?"),
    "moving": (0.3, SHAPES, "which shape moves?"),
    "speed": (0.2, ("faster", "slower"), "does the {color} {shape} move faster or slower than the {color2} {shape2}?"),
}
SPLITS: dict[str, int] = {"train": 0, "eval": 1}
# Bump whenever the samples a (seed, split, index) produces change: generated copies are remade.
GENERATOR_VERSION = 2


def vocabulary() -> list[str]:
    """All words/punctuation the generator can emit (questions and answers), sorted."""
    words: set[str] = set(COLORS) | set(SHAPES)
    for _, answers, template in QUESTION_TYPES.values():
        words |= set(answers)
        text = template.replace("?", " ?")
        words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


def answer_distribution() -> dict[str, float]:
    """Probability of every answer word under the generator's sampling scheme."""
    dist: dict[str, float] = {}
    for weight, answers, _ in QUESTION_TYPES.values():
        for a in answers:
            dist[a] = dist.get(a, 0.0) + weight / len(answers)
    return dist


def chance_accuracy() -> float:
    """Best accuracy without looking at the frames: per question type, always answer the most likely answer.

    The question text reveals the type (and nothing more), answers are uniform within a type, so this is
    ``sum_t weight_t * max_a P(a | t) = 0.5/4 + 0.3/3 + 0.2/2 = 0.325``.
    """
    total = sum(w for w, _, _ in QUESTION_TYPES.values())
    dist = answer_distribution()
    # Answer sets of different types are disjoint, so P(a | t) = P(a) / weight_t.
    return sum(max(dist[a] for a in answers) for _, answers, _ in QUESTION_TYPES.values()) / total


@dataclass(frozen=True)
class ShapeTrack:
    """One object: its look, its position at frame 0 (centre, pixels), velocity (pixels/frame), first frame shown."""

    color: str
    shape: str
    x0: float
    y0: float
    vx: float
    vy: float
    appear: int = 0

    def center(self, frame: int) -> tuple[float, float]:
        return self.x0 + self.vx * frame, self.y0 + self.vy * frame


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
        if num_frames < 3:  # motion needs >= 2 frames; 3 keep the tracks' positions spread over the path
            raise ValueError(f"num_frames must be >= 3, got {num_frames}")
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
        return {"frames": self.render(plan), "question": plan.question, "answer": plan.answer}

    def __iter__(self):
        for i in range(self.num_samples):
            yield self[i]

    # --- scene planning (cheap, no pixels) ---------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    @property
    def radius(self) -> float:
        # Big shapes: a quarter of the frame wide.
        return self.frame_size / 8.0

    def _track_along(
        self,
        rng: np.random.Generator,
        color: str,
        shape: str,
        vector: tuple[int, int],
        distance: float,
        across: float | None = None,
    ) -> ShapeTrack:
        """A track moving ``distance`` pixels along each non-zero axis of the unit ``vector`` (components in
        {-1, 0, 1}), staying fully inside the frame.

        An axis without motion gets the position of a mover of ``across`` pixels (default ``distance``) at
        a random frame, so a single frame's position has the same distribution on every axis whether the
        object moves along it or not (one frame does not reveal the motion axis).
        """
        r, p, f = self.radius, self.frame_size, self.num_frames
        lo, hi = r + 1.0, p - r - 1.0
        start = []
        for u in vector:
            if u != 0:  # start so that the whole path fits
                s0 = rng.uniform(lo, hi - distance)
                start.append(s0 if u > 0 else s0 + distance)
            else:
                d = distance if across is None else across
                start.append(rng.uniform(lo, hi - d) + d * int(rng.integers(f)) / (f - 1))
        speed = distance / (f - 1)
        return ShapeTrack(color, shape, start[0], start[1], vector[0] * speed, vector[1] * speed)

    def _track_direction(
        self, rng: np.random.Generator, color: str, shape: str, direction: str, distance: float
    ) -> ShapeTrack:
        return self._track_along(rng, color, shape, _DIRECTION_VECTORS[direction], distance, across=0.0)

    def _random_vector(self, rng: np.random.Generator, motion: str) -> tuple[int, int]:
        vectors = _MOTION_VECTORS[motion]
        return vectors[int(rng.integers(len(vectors)))]

    def _pick_objects(self, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
        # Colours are distinct within a scene so "the red square" is unambiguous and colour masks isolate objects.
        colors = rng.choice(list(COLORS), size=n, replace=False)
        shapes = rng.choice(SHAPES, size=n, replace=True)
        return [(str(c), str(s)) for c, s in zip(colors, shapes, strict=True)]

    def plan(self, index: int) -> ScenePlan:
        """The scene and question of sample ``index`` (no rendering)."""
        rng = self._rng(index)
        qtype = self._qtypes[int(rng.choice(len(self._qtypes), p=self._qprobs))]
        _, answers, template = QUESTION_TYPES[qtype]
        answer = str(answers[int(rng.integers(len(answers)))])  # uniform answers within a type
        p, r = self.frame_size, self.radius
        span = p - 2 * r - 2.0  # longest straight path that stays inside the frame
        if qtype == "motion":
            objs = self._pick_objects(rng, int(rng.integers(1, 3)))
            tracks = []
            for c, s in objs[1:]:  # distractors: random axis, smaller amplitude, drawn below the target
                vec = self._random_vector(rng, MOTIONS[int(rng.integers(len(MOTIONS)))])
                tracks.append(self._track_along(rng, c, s, vec, rng.uniform(0.15, 0.45) * span))
            # The target moves far (>= 60% of the free span) unless still, and is drawn last (never occluded).
            # A still target sits where a far mover would be at a random frame (same single-frame statistics).
            far = rng.uniform(0.6, 0.9) * span
            vec = self._random_vector(rng, answer)
            tracks.append(self._track_along(rng, *objs[0], vec, 0.0 if answer == "still" else far, across=far))
            c, s = objs[0]
            question = template.format(color=c, shape=s)
        elif qtype == "moving":
            n = int(rng.integers(2, 4))
            colors = rng.choice(list(COLORS), size=n, replace=False)
            others = rng.choice([x for x in SHAPES if x != answer], size=n - 1, replace=False)
            tracks = []
            for i, (c, sh) in enumerate(zip(colors, [answer, *others], strict=True)):
                far = rng.uniform(0.6, 0.9) * span  # static ones sit where such a mover would be at a random frame
                vec = self._random_vector(rng, str(MOTIONS[int(rng.integers(3))])) if i == 0 else (0, 0)
                tracks.append(self._track_along(rng, str(c), str(sh), vec, far if i == 0 else 0.0, across=far))
            order = rng.permutation(n)  # random draw order: being on top does not give the mover away
            tracks = [tracks[int(k)] for k in order]
            question = template
        else:  # speed
            objs = self._pick_objects(rng, 2)
            fast, slow = rng.uniform(0.65, 0.9) * span, rng.uniform(0.1, 0.25) * span  # ratio >= 2.6
            d_a, d_b = (fast, slow) if answer == "faster" else (slow, fast)
            tracks = [
                self._track_direction(rng, *objs[1], str(rng.choice(DIRECTIONS)), d_b),
                self._track_direction(rng, *objs[0], str(rng.choice(DIRECTIONS)), d_a),
            ]
            (c, s), (c2, s2) = objs
            question = template.format(color=c, shape=s, color2=c2, shape2=s2)
        return ScenePlan(qtype, question, answer, tuple(tracks))

    # --- rendering ---------------------------------------------------------------------------------------
    def render(self, plan: ScenePlan) -> np.ndarray:
        """uint8 [F, P, P, 3] frames of a plan; later tracks are drawn on top."""
        f, p = self.num_frames, self.frame_size
        frames = np.empty((f, p, p, 3), dtype=np.uint8)
        frames[:] = np.array(BACKGROUND, dtype=np.uint8)
        for t in range(f):
            for tr in plan.tracks:
                if t < tr.appear:
                    continue
                cx, cy = tr.center(t)
                frames[t][_shape_mask(tr.shape, cx, cy, self.radius, p)] = COLORS[tr.color]
        return frames


def color_centroid(frame: np.ndarray, color: str) -> tuple[float, float] | None:
    """(x, y) centroid of the pixels of ``color`` in a uint8 [H, W, 3] frame, None if absent."""
    mask = np.all(frame == np.array(COLORS[color], dtype=np.uint8), axis=-1)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def centroid_extents(centroids: list[tuple[float, float]]) -> tuple[float, float]:
    """(x range, y range) of a set of centroids: a function of the set, not of its order."""
    xs, ys = [c[0] for c in centroids], [c[1] for c in centroids]
    return max(xs) - min(xs), max(ys) - min(ys)


def motion_from_centroids(centroids: list[tuple[float, float]], min_move: float = 1.0) -> str:
    """The motion axis (one of :data:`MOTIONS`) of an object from its centroids in any order."""
    ex, ey = centroid_extents(centroids)
    if max(ex, ey) < min_move:
        return "still"
    if min(ex, ey) >= 0.5 * max(ex, ey):
        return "diagonally"
    return "sideways" if ex > ey else "vertically"


def displacement(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Euclidean distance between two centroids."""
    return math.hypot(b[0] - a[0], b[1] - a[1])
