"""Regenerate every GPU results file the docs quote, on one GPU, stage by stage.

    python3 tools/regenerate_gpu_results.py OUT_DIR                      # every stage, in order
    python3 tools/regenerate_gpu_results.py OUT_DIR --only tests,check   # some of them
    python3 tools/regenerate_gpu_results.py OUT_DIR --dry-run            # print the plan only

Stages (each writes OUT_DIR/<file>, named by the device, e.g. ``h200``):

    tests        the GPU tests (pytest; --tests)        gpu_tests_<device>.json
    check        tools/gpu_check.py                     gpu_check_<device>.json
    bench        tools/bench_block_attention.py         block_attention_<device>.json (--bench-flags)
    sweep        the same with --sweep (Triton tiles)   triton_tile_sweep_<device>.json
    memory       tools/xattn_memory.py                  xattn_memory_<device>.json
    train        pretrain_mllm.py single-gpu-1b.yaml    train_1b_<device>.json (+ tools/train_summary.py)
    train-fused  the same with backend: fused           train_1b_<device>_fused.json
    train-long-video  single-gpu-1b-long-video.yaml     train_1b_long_video_<device>.json
    vision       tools/bench_vision_encoder.py          vision_encoder_<device>.json
    generation   tools/bench_generation.py (1B config)  generation_1b_<device>.json

Each stage runs under its own time limit and what is left of ``--budget-s`` (a stage that cannot
get its minimum is not started), so a selection fits a machine's limit per command; everything
the stages print goes to the console with a stage prefix and to OUT_DIR/regenerate_<device>.log.
With ``--wheels DIR`` (default ``.whl`` when it holds wheels) the wheels are installed into a
temporary folder first and put on the stages' ``PYTHONPATH``, for machines without megatron-core,
pydantic, webdataset and PyAV (``scripts/fetch_gpu_wheels.sh`` downloads them; docs/results.md). Exit
status 0 when every selected stage succeeded.
"""

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = (
    "tests/ops/test_cuda_ops.py",
    "tests/ops/test_triton_backend.py",
    "tests/models/test_mllama_vision.py",
    "tests/core/test_norm.py",
    "tests/training/test_profiling.py::test_the_gpu_profile_times_kernels_and_the_device_idle_time",
)
# stage -> (config, results file name with {device}, logged steps left out of the medians: compilation,
# allocator warm-up; the long-video config runs 6 steps, the others 12)
TRAIN_CONFIGS = {
    "train": ("examples/configs/single-gpu-1b.yaml", "train_1b_{device}.json", 3),
    "train-fused": ("examples/configs/single-gpu-1b-fused.yaml", "train_1b_{device}_fused.json", 3),
    "train-long-video": ("examples/configs/single-gpu-1b-long-video.yaml", "train_1b_long_video_{device}.json", 2),
}
MEGATRON = ("megatron.core", "pydantic", "yaml")
# The Triton tile sweep's shapes: a short query block (Triton under auto) and two tall ones (docs/ops.md).
SWEEP_SHAPES = "32/8:64:65536,32/8:256:65536,32/8:1024:65536"


class StageError(RuntimeError):
    """A stage's command failed or ran out of time; the message says which and how."""


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: float  # the most it may take
    min_s: float  # not started with less than this left of the budget
    needs: tuple[str, ...]  # modules its commands import
    run: Callable[["Context"], None]


class Context:
    """What the stages share: paths, the environment of their commands, the clock and the log."""

    def __init__(self, args: argparse.Namespace, argv: list[str], device: str, env: dict[str, str]) -> None:
        self.args, self.argv, self.device, self.env = args, argv, device, env
        self.out = Path(args.out_dir).resolve()
        self.python = sys.executable
        self.deadline = 0.0  # of the running stage
        self.stage = ""
        self.log = None

    def output(self, name: str) -> Path:
        return self.out / name

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()

    def run(self, argv: list[str]) -> None:
        """Run one command in the repository, its output prefixed with the stage; StageError on failure."""
        self.say(f"[{self.stage}] $ {shlex.join(argv)}")
        if self.args.dry_run:
            return
        timeout = self.deadline - time.monotonic()
        # A session of its own, so a timeout can end the command with every process it started.
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        reader = threading.Thread(target=self._relay, args=(proc,), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            stop_session(proc)
            reader.join(timeout=10)
            raise StageError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from None
        reader.join(timeout=10)
        if rc != 0:
            raise StageError(f"exit status {rc}: {shlex.join(argv)}")

    def _relay(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.say(f"[{self.stage}] {line.rstrip()}")


def stop_session(proc: subprocess.Popen) -> None:
    """SIGINT the command's session (its process group), then SIGTERM, then SIGKILL what is left.

    SIGINT first: pytest then still writes its junit report of the tests that finished (and a
    Python tool its partial output), which SIGTERM would lose.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group has ended
            return
        with contextlib.suppress(subprocess.TimeoutExpired):  # then the next signal
            proc.wait(timeout=10)
        if sig != signal.SIGKILL:
            time.sleep(1)  # the command's own children may still be handling the signal


def junit_counts(path: Path) -> tuple[dict[str, int], list[dict]]:
    """Counts of passed/failed/errors/skipped and each test's outcome from a pytest junit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "errors"}.get(tag, tag)
        name = f"{case.get('classname')}::{case.get('name')}"
        tests.append({"test": name, "outcome": outcome, "time_s": float(case.get("time", 0))})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "errors", "skipped")}
    return {**counts, "total": len(tests)}, tests


def stage_tests(ctx: Context) -> None:
    out = ctx.output(f"gpu_tests_{ctx.device}.json")
    with tempfile.TemporaryDirectory(prefix="lvx-junit-") as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *ctx.args.tests]
        failure = None
        try:
            ctx.run(argv)
        except StageError as err:  # failing tests still leave their report: record it, then fail
            failure = err
        if ctx.args.dry_run:
            return
        if not junit.is_file():
            raise failure or StageError("pytest wrote no junit report")
        counts, tests = junit_counts(junit)
    extra = {"tests_command": shlex.join(argv), "test_files": list(ctx.args.tests)}
    call_results(
        ctx.env, "write_results", str(out), "regenerate_gpu_results.py", ctx.argv, extra, counts=counts, tests=tests
    )
    ctx.say(f"[{ctx.stage}] {counts}")
    if failure is not None:
        raise failure


def stage_check(ctx: Context) -> None:
    ctx.run([ctx.python, "tools/gpu_check.py", "--output", str(ctx.output(f"gpu_check_{ctx.device}.json"))])


def stage_bench(ctx: Context) -> None:
    out = ctx.output(f"block_attention_{ctx.device}.json")
    ctx.run([ctx.python, "tools/bench_block_attention.py", *shlex.split(ctx.args.bench_flags), "--output", str(out)])


def stage_sweep(ctx: Context) -> None:
    out = ctx.output(f"triton_tile_sweep_{ctx.device}.json")
    ctx.run([ctx.python, "tools/bench_block_attention.py", "--sweep", "--shapes", SWEEP_SHAPES, "--iters", "10",
             "--output", str(out)])  # fmt: skip


def stage_memory(ctx: Context) -> None:
    ctx.run([ctx.python, "tools/xattn_memory.py", "--output", str(ctx.output(f"xattn_memory_{ctx.device}.json"))])


def stage_vision(ctx: Context) -> None:
    ctx.run(
        [ctx.python, "tools/bench_vision_encoder.py", "--output", str(ctx.output(f"vision_encoder_{ctx.device}.json"))]
    )


def stage_generation(ctx: Context) -> None:
    out = ctx.output(f"generation_1b_{ctx.device}.json")
    ctx.run([ctx.python, "tools/bench_generation.py", "--frames", "32,128", "--output", str(out)])


def run_dir(config: Path) -> Path:
    """Where pretrain_mllm.py writes metrics.jsonl for ``config``: checkpoint.save, else logging.run_dir."""
    tree = yaml.safe_load(config.read_text()) or {}
    save = (tree.get("checkpoint") or {}).get("save")
    return REPO / (save or (tree.get("logging") or {}).get("run_dir") or "runs/default")  # relative to the repo


def stage_train(ctx: Context) -> None:
    config, name, skip = TRAIN_CONFIGS[ctx.stage]
    out = ctx.output(name.format(device=ctx.device))
    metrics = run_dir(REPO / config) / "metrics.jsonl"
    if metrics.is_file() and not ctx.args.dry_run:  # the log appends: an earlier run's steps would mix in
        ctx.say(f"[{ctx.stage}] removing the earlier run's {metrics}")
        metrics.unlink()
    train = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "pretrain_mllm.py"]
    train += ["--config", config, "--wandb-mode", "disabled"]
    ctx.run(train)
    ctx.run(
        [ctx.python, "tools/train_summary.py", str(metrics), "--skip", str(skip),
         "--command", shlex.join(["python", *train[1:]]), "--output", str(out)]
    )  # fmt: skip


STAGES = {
    s.name: s
    for s in (
        # tests and check compile most of the Triton kernels' variants (a fresh machine has no
        # Triton cache): earlier H200 runs took over 286 s for tests, so each may use a whole call
        Stage("tests", 560, 60, MEGATRON, stage_tests),
        Stage("check", 560, 60, MEGATRON, stage_check),
        Stage("bench", 570, 120, (), stage_bench),
        Stage("sweep", 400, 90, (), stage_sweep),  # 56 s on an H200 after the bench (216 timings)
        Stage("memory", 240, 60, MEGATRON, stage_memory),
        Stage("train", 420, 180, (*MEGATRON, "webdataset", "av"), stage_train),
        Stage("train-fused", 420, 180, (*MEGATRON, "webdataset", "av"), stage_train),
        Stage("train-long-video", 420, 150, (*MEGATRON, "webdataset", "av"), stage_train),
        Stage("vision", 300, 60, MEGATRON, stage_vision),
        Stage("generation", 300, 90, MEGATRON, stage_generation),
    )
}


def install_wheels(wheels: Path, env: dict[str, str], say: Callable[[str], None]) -> str:
    """pip-install ``wheels/*.whl`` (no index, no dependencies) into a temporary folder; return it."""
    site = tempfile.mkdtemp(prefix="lvx-site-")
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    say(f"[wheels] installing {len(files)} wheels from {wheels} into {site}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--upgrade", "--target", site, *files],
        check=True,
        env=env,
    )  # fmt: skip
    return site


def missing_modules(modules: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Which of ``modules`` the stages' interpreter cannot import (checked in a child, with its env)."""
    if not modules:
        return []
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    proc = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True, cwd=REPO)
    return proc.stdout.split()


def call_results(env: dict[str, str], function: str, *args, **kwargs):
    """``lvx_megatron.results.<function>(*args, **kwargs)``, called in a child with ``env``; its value.

    This tool imports nothing of the package itself: on a GPU machine it runs without the package
    installed and before its wheels are, and the results it writes must name the versions the stages
    ran. The stages' environment has the repository and the wheels' folder on PYTHONPATH; a child
    also keeps the CUDA context that detecting the device makes out of this process.
    """
    code = (
        "import json, sys\nfrom lvx_megatron import results\n"
        "a = json.load(sys.stdin)\nprint(json.dumps(getattr(results, a['f'])(*a['args'], **a['kwargs'])))"
    )
    spec = json.dumps({"f": function, "args": args, "kwargs": kwargs})
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, input=spec, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe_source(state: dict) -> str:
    """One line of the code the stages measure: its commit and whether the files are exactly that commit's."""
    tree = f", tree {state['tree']}" if state.get("tree") else ""
    if state["dirty"] is False:
        how = "the copy's tree hash is the commit's" if state.get("tree_check") == "verified" else "clean"
        return f"commit {state['commit']}{tree}: {how}"
    return f"commit {state['commit']}{tree}: dirty {state['dirty']} ({state.get('tree_check', state['changed'])})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the results files and the log")
    parser.add_argument(
        "--only", default=",".join(STAGES), help=f"comma-separated stages (default: {','.join(STAGES)})"
    )
    parser.add_argument("--budget-s", type=float, default=570.0, help="time for all selected stages together")
    parser.add_argument(
        "--bench-flags", default=os.environ.get("BENCH_FLAGS", ""), help="more flags of the bench stage ($BENCH_FLAGS)"
    )
    parser.add_argument("--tests", nargs="+", default=list(GPU_TESTS), help="test files of the tests stage")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (default: .whl if it holds any)")
    parser.add_argument("--device-name", help="name the files after this device instead of the GPU's")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument(
        "--allow-unverified",
        action="store_true",
        help="run although $LVX_SOURCE_COMMIT is set and this copy's tree hash is not that commit's",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--only: unknown stage(s) {', '.join(unknown) or '(none given)'}; stages: {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]  # always in the documented order
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    wheels = args.wheels or (REPO / ".whl")
    site = None
    if not args.dry_run and wheels.is_dir() and any(wheels.glob("*.whl")):
        try:
            site = install_wheels(wheels, env, print)
        except subprocess.CalledProcessError as err:
            print(f"regenerate_gpu_results: installing the wheels of {wheels} failed ({err})", file=sys.stderr)
            return 2
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), site, env.get("PYTHONPATH")) if p)
    device = call_results(env, "device_slug", args.device_name)  # of this machine's GPU without a name
    source = call_results(env, "git_state")
    if os.environ.get("LVX_SOURCE_COMMIT") and source["dirty"] is not False and not args.allow_unverified:
        print(
            f"regenerate_gpu_results: this copy is not $LVX_SOURCE_COMMIT {source['commit']}: {source['tree_check']}"
            f" (changed: {source['changed']}); nothing run (--allow-unverified runs anyway, its files say dirty)",
            file=sys.stderr,
        )
        return 2
    ctx = Context(args, argv, device, env)
    if not args.dry_run:
        ctx.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with open(os.devnull if args.dry_run else ctx.out / f"regenerate_{device}.log", "a") as log:
        ctx.log = log
        ctx.say(f"[regenerate] device {device}; stages {', '.join(args.stages)}; budget {args.budget_s:.0f} s")
        ctx.say(f"[regenerate] source {describe_source(source)}")
        for name in args.stages:
            stage = STAGES[name]
            left = args.budget_s - (time.monotonic() - start)
            began = time.monotonic()
            if left < stage.min_s:
                outcomes.append((name, f"not started: {left:.0f} s left, it needs {stage.min_s:.0f}", 0.0, []))
                ctx.say(f"[regenerate] {name}: {outcomes[-1][1]}")
                continue
            ctx.stage, ctx.deadline = name, began + min(stage.limit_s, left)
            ctx.say(f"[regenerate] {name}: up to {min(stage.limit_s, left):.0f} s")
            written_before = time.time()
            try:
                missing = [] if args.dry_run else missing_modules(stage.needs, env)
                if missing:
                    raise StageError(f"cannot import {', '.join(missing)}: carry wheels (docs/results.md)")
                stage.run(ctx)
                status = "planned" if args.dry_run else "ok"
            except StageError as err:
                status = f"FAILED: {err}"
            # what the stage wrote, also when it failed (gpu_check records its failures, say)
            files = sorted(p.name for p in ctx.out.glob("*.json") if p.stat().st_mtime >= written_before)
            outcomes.append((name, status, time.monotonic() - began, files))
            ctx.say(f"[regenerate] {name}: {status} ({outcomes[-1][2]:.0f} s)")
        ctx.say("[regenerate] summary:")
        for name, status, seconds, files in outcomes:
            ctx.say(f"  {name:<12} {status} ({seconds:.0f} s) {' '.join(files)}")
    if site is not None:
        shutil.rmtree(site, ignore_errors=True)
    return 0 if all(status in ("ok", "planned") for _, status, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
