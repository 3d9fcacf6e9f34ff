"""Where a training step's time goes: ``torch.profiler`` over a few iterations, split by model phase.

``training.profile`` (``--profile``) profiles iterations ``profile_step_start + 1 .. profile_step_end``
(Megatron-LM's numbering: start after ``profile_step_start`` finished iterations, stop after
``profile_step_end``) on the ranks in ``profile_ranks`` and writes, per rank, under
``<save or run_dir>/profile/``:

* ``rank<R>_trace.json``: the Chrome/Perfetto trace (``chrome://tracing``, https://ui.perfetto.dev);
* ``rank<R>_phases.json`` and a table on the console: time per step and share of the step per phase.

Phases come from the model's own modules (forward hooks open a ``record_function`` range named after
the phase), so every op knows the phase it runs in; backward ops inherit the phase of the forward op
that made them, through autograd's sequence numbers. On a GPU a phase's time is the device time of
the kernels its ops launched; on CPU it is the ops' own CPU time. Collective kernels and ops (NCCL,
gloo) count as ``communication`` wherever they run; ``idle`` is the step's wall time the device had
no kernel running (host overhead, synchronisation, data waits), GPU only.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

PHASE_PREFIX = "lvx_phase::"
# (phase, pattern on a module's qualified name); the first match names a module's phase and its
# submodules are not looked at. Names follow the three model families (models/).
MODULE_PHASES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (phase, re.compile(pattern))
    for phase, pattern in (
        ("vision encoder", r"(^|\.)vision_model$"),
        ("projector", r"(^|\.)(multi_modal_projector|perceiver|visual_projection|vision_projection)$"),
        ("text embedding", r"(^|\.)embedding$"),
        ("cross-attention", r"(^|\.)cross_attention$"),
        ("text self-attention", r"(^|\.)self_attention$"),
        ("text MLP", r"(^|\.)mlp$"),
        ("LM head", r"(^|\.)output_layer$"),
    )
)
# The rest of the model's forward (norms, residual adds, rotary tables, the loss) and the loop's phases.
MODEL_REST = "model, rest (norms, residuals, loss)"
LOOP_PHASES = ("data", "optimizer", "gradient check")
BACKWARD_REST = "backward, rest (gradient accumulation, hooks)"
COMMUNICATION = "communication"
IDLE = "idle (device waits on the host)"
_COLLECTIVE = re.compile(r"nccl|gloo|c10d::|all_reduce|allreduce|all_gather|allgather|reduce_scatter|broadcast", re.I)
_BACKWARD = "autograd::engine::evaluate_function: "


def phase_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose forward is a phase, as ``(phase, module)``, outermost first."""
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        for phase, pattern in MODULE_PHASES:
            if pattern.search(name):
                found.append((phase, module))
                return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


@contextmanager
def loop_phase(name: str) -> Iterator[None]:
    """A range the profiler attributes to the training loop's phase ``name`` (about a microsecond when
    no profiler runs)."""
    with record_function(PHASE_PREFIX + name):
        yield


class PhaseHooks:
    """Forward pre/post hooks that open and close a phase's range around each matching module."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        for phase, module in [(MODEL_REST, model), *phase_modules(model)]:
            self.handles.append(module.register_forward_pre_hook(self._enter(phase)))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    @staticmethod
    def _enter(phase: str) -> Callable:
        def hook(module: nn.Module, args) -> None:
            stack = module.__dict__.setdefault("_lvx_profile_ranges", [])
            stack.append(torch.ops.profiler._record_function_enter_new(PHASE_PREFIX + phase, None))

        return hook

    @staticmethod
    def _exit(module: nn.Module, args, output) -> None:
        stack = module.__dict__.get("_lvx_profile_ranges")
        if stack:
            torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _phase_of_range(event) -> str | None:
    """The innermost phase range around ``event`` (itself included), or None."""
    node = event
    while node is not None:
        if node.name.startswith(PHASE_PREFIX):
            return node.name[len(PHASE_PREFIX) :]
        node = node.cpu_parent
    return None


def _backward_root(event):
    """The autograd engine's ``evaluate_function`` event ``event`` runs under, or None."""
    node = event
    while node is not None:
        if node.name.startswith(_BACKWARD):
            return node
        node = node.cpu_parent
    return None


def attribute(events) -> Iterator[tuple[object, str, str]]:
    """``(event, phase, direction)`` for every event of ``events`` (``profile.events()``); direction is
    ``forward`` or ``backward`` (which includes activation-checkpointing recompute)."""
    # Forward ops that recorded an autograd node: (thread, sequence number) -> phase.
    forward_phase: dict[tuple[int, int], str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(_BACKWARD) and _backward_root(e) is None:
            phase = _phase_of_range(e)
            if phase is not None:
                forward_phase.setdefault((e.thread, e.sequence_nr), phase)
    for e in events:
        root = _backward_root(e)
        direction = "forward" if root is None else "backward"
        if any(_COLLECTIVE.search(n) for n in (e.name, *(k.name for k in e.kernels))):
            yield e, COMMUNICATION, direction
        elif root is not None:
            yield (
                e,
                _phase_of_range(e) or forward_phase.get((root.fwd_thread, root.sequence_nr), BACKWARD_REST),
                direction,
            )
        else:
            yield e, _phase_of_range(e) or "outside the model", direction


def phase_times(events, on_device: bool) -> dict[str, dict[str, float]]:
    """Seconds per phase and direction (``forward``, ``backward``, ``total``) over ``events``: the
    kernels' device time on a device, the ops' self CPU time on CPU."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for e, phase, direction in attribute(events):
        seconds = (sum(k.duration for k in e.kernels) if on_device else e.self_cpu_time_total) * 1e-6
        if seconds > 0:
            totals[phase][direction] += seconds
    return {p: {**t, "total": t["forward"] + t["backward"]} for p, t in totals.items()}


# Kineto's activity types of work on the device; its GPU-side "gpu_user_annotation" ranges (the
# record_function ranges mirrored onto the device's timeline) span idle time and do not count.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def union_seconds(intervals) -> float:
    """Total length of the union of ``(start_ns, duration_ns)`` intervals, in seconds."""
    busy, end = 0, None
    for start, stop in sorted((a, a + d) for a, d in intervals if d > 0):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy * 1e-9


def device_busy_seconds(trace: Path) -> float:
    """Wall time with at least one kernel, copy or memset running on the device, from an exported
    Chrome trace (its event categories are the same in every torch version; the profiler's in-memory
    Kineto events gained ``activity_type()`` only after torch 2.11)."""
    events = json.loads(Path(trace).read_text())["traceEvents"]
    work = ((round(e["ts"] * 1e3), round(e["dur"] * 1e3)) for e in events if e.get("cat") in DEVICE_WORK and "dur" in e)
    return union_seconds(work)


def phase_table(phases: dict, step_s: float) -> str:
    """A markdown table: per phase forward, backward and total ms per step and share of the step."""
    lines = ["| phase | forward ms | backward ms | total ms | share of step |", "|---|---|---|---|---|"]
    for name, t in sorted(phases.items(), key=lambda kv: -kv[1]["total"]):
        lines.append(
            f"| {name} | {t['forward'] * 1e3:.1f} | {t['backward'] * 1e3:.1f} | {t['total'] * 1e3:.1f} | "
            f"{t['total'] / step_s:.1%} |"
        )
    lines.append(f"| step (wall) | | | {step_s * 1e3:.1f} | 100% |")
    return "\n".join(lines)


class StepProfiler:
    """Profiles the configured iterations of one rank and writes its trace and phase table."""

    def __init__(self, model: nn.Module, start: int, end: int, out_dir: Path, rank: int, device: torch.device):
        self.model, self.start, self.end = model, start, end
        self.out_dir, self.rank, self.device = Path(out_dir), rank, device
        self.prof: profile | None = None
        self.hooks: PhaseHooks | None = None
        self.began = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, finished: int) -> None:
        """Call before each iteration with the number of finished iterations."""
        if finished != self.start or self.prof is not None:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.hooks = PhaseHooks(self.model)
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self._sync()
        self.prof.start()
        self.began = time.perf_counter()

    def after_step(self, finished: int) -> dict | None:
        """Call after each iteration; at ``end`` stops, writes the files and returns the summary."""
        if self.prof is None or finished != self.end:
            return None
        self._sync()
        wall = time.perf_counter() - self.began
        self.prof.stop()
        self.hooks.remove()
        steps = self.end - self.start
        on_device = self.device.type == "cuda"
        phases = {
            p: {k: v / steps for k, v in t.items()} for p, t in phase_times(self.prof.events(), on_device).items()
        }
        step_s = wall / steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}_trace.json"
        self.prof.export_chrome_trace(str(trace))
        if on_device:
            idle = max(0.0, step_s - device_busy_seconds(trace) / steps)
            phases[IDLE] = {"forward": 0.0, "backward": 0.0, "total": idle}
        summary = {
            "rank": self.rank,
            "device": torch.cuda.get_device_name(self.device) if on_device else "cpu",
            "iterations": [self.start + 1, self.end],
            "step_s": step_s,
            "time_source": "device kernels" if on_device else "CPU self time",
            "phases": phases,
            "trace": str(trace),
        }
        (self.out_dir / f"rank{self.rank}_phases.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.prof = None
        summary["table"] = phase_table(phases, step_s)
        return summary
