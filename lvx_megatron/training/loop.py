"""The training loop of ``pretrain_mllm.py`` on megatron-core's schedules, optimizer and checkpoints.

One iteration: this replica's micro-batches -> ``get_forward_backward_func()`` (no pipelining, or
1F1B across pipeline stages with the ``[text; X]`` stage tensors) -> megatron optimizer step
(gradients summed over DP x CP and divided by the global count of answer tokens, clipped) ->
``OptimizerParamScheduler`` step. Losses are per-token means over the whole global batch, so
every parallel layout computes the same numbers.
"""

import math
import resource
import signal
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training.dist_signal_handler import DistributedSignalHandler

from ..models.sharding import text_range
from .checkpointing import (
    DIVERGED,
    checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
    set_aside_diverged,
    tracked_iteration,
)
from .config import RunConfig
from .data import TooManyBadSamples, chance_levels, make_sources, make_tokenizer, prepare_datasets
from .families import family
from .flops import flops_per_sample, peak_flops, visual_tokens_per_image
from .layout_check import validate_layout
from .plots import plot_run
from .profiling import StepProfiler, loop_phase
from .run_lock import lock_output_dir
from .run_logger import RunLogger, format_duration
from .setup import TrainState, build_train_state, init_distributed
from .watchdog import HangWatchdog
from .xattn_timer import CrossAttentionTimer, StepTimer, device_sync


def _loss_func(loss_mask: torch.Tensor, question_type: torch.Tensor, output):
    """megatron loss function: summed token loss, token count, and logging sums."""
    loss, correct = output
    mask = loss_mask.float()
    loss_sum = (loss.float() * mask).sum()
    tokens = mask.sum()
    wrong = ((~correct) & mask.bool()).sum(dim=1).float()  # per sample, this CP rank's rows
    report = {"loss_sum": loss_sum.detach(), "tokens": tokens.detach(), "wrong": wrong, "qtype": question_type}
    return loss_sum, tokens.to(torch.int), report


def _forward_step(state: TrainState, model_inputs: tuple[str, ...], data_iterator, model):
    """megatron forward step: the batch keys ``model_inputs`` (the family's) go to the model."""
    batch = next(data_iterator)
    cp = state.pg.cp
    start, stop = text_range(batch["tokens"].shape[1], cp.size(), cp.rank())
    output = model(**{k: batch[k] for k in model_inputs})
    return output, partial(_loss_func, batch["loss_mask"][:, start:stop], batch["question_type"])


def _reduce_reports(state: TrainState, reports: list[dict], device, question_types: list[str]) -> dict:
    """Global loss (per token) and answer accuracy from every last-stage rank's reports, and the
    accuracy of each of ``question_types`` (``accuracy/<type>``)."""
    types = len(question_types)
    # loss_sum, tokens, correct, samples, then (correct, samples) per question type
    totals = torch.zeros(4 + 2 * types, dtype=torch.float64, device=device)
    last = state.pg.pp.rank() == state.pg.pp.size() - 1
    if last and reports:
        wrong = torch.cat([r["wrong"] for r in reports])
        dist.all_reduce(wrong, group=state.pg.cp)  # a sample's answer may span CP ranks
        if state.pg.tp.rank() == 0:
            totals[0] = sum(float(r["loss_sum"]) for r in reports)
            totals[1] = sum(float(r["tokens"]) for r in reports)
            if state.pg.cp.rank() == 0:
                right = (wrong == 0).double()
                totals[2], totals[3] = right.sum(), float(wrong.numel())
                qtype = torch.cat([r["qtype"] for r in reports]).to(device)
                for t in range(types):
                    totals[4 + 2 * t] = right[qtype == t].sum()
                    totals[5 + 2 * t] = float((qtype == t).sum())
    dist.all_reduce(totals)
    values = totals.tolist()
    loss_sum, tokens, correct, samples = values[:4]
    metrics = {"loss": loss_sum / max(tokens, 1.0), "accuracy": correct / max(samples, 1.0)}
    for t, name in enumerate(question_types):
        metrics[f"accuracy/{name}"] = values[4 + 2 * t] / max(values[5 + 2 * t], 1.0)
    return metrics


class TrainingDiverged(FloatingPointError):
    """The run stopped because its weights diverged; the message is one line naming the newest healthy checkpoint."""


class Trainer:
    """Owns a run: set-up, iterations, evaluation, checkpoints, logging."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = init_distributed()
        self.lock = lock_output_dir(cfg)  # before any work: a second run on the folder stops here
        try:
            self._set_up(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _set_up(self, cfg: RunConfig) -> None:
        self.layout = validate_layout(cfg, dist.get_world_size())
        self.tokenizer = make_tokenizer(cfg)
        self.datasets = prepare_datasets(cfg)
        self.state = build_train_state(cfg, self.tokenizer.vocab_size, self.device)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        verbose = dist.get_rank() == 0
        sources = make_sources(cfg, self.datasets, self.tokenizer, dp_rank, dp_size, verbose)
        self.train_source, self.eval_source = sources["train"], sources["eval"]
        self.logger = RunLogger(cfg, writer=dist.get_rank() == 0)
        sync = device_sync(self.device)
        self.step_timer = StepTimer(
            CrossAttentionTimer(self.state.stage, sync), cfg.training.xattn_timing_interval, sync
        )
        self.flops_per_sample = flops_per_sample(cfg, self.state.stage.text.padded_vocab_size)
        self.peak = peak_flops(self.device)
        tr = cfg.training
        self.profiler = (
            StepProfiler(
                self.state.stage,
                tr.profile_step_start,
                tr.profile_step_end,
                cfg.output_dir / "profile",
                dist.get_rank(),
                self.device,
            )
            if tr.profile and dist.get_rank() in tr.profile_ranks
            else None
        )
        self.iteration = 0
        self.skipped_steps = 0
        self.failed_in_a_row = 0  # non-finite steps since the last finite one
        # This run's checkpoints of the current weights while no step from them was finite yet: when the
        # weights diverged, these hold the diverged weights.
        self.unconfirmed: list[Path] = []
        self.watchdog = HangWatchdog(cfg.training.hang_timeout_s, dist.get_rank())
        # The iteration of the intact checkpoint this run has under checkpoint.save (loaded or saved by it):
        # a save at that iteration would write the same state again. Not the tracker's iteration: when the
        # tracked checkpoint was damaged or missing, the run resumed from an older one and must save again.
        self.checkpointed_iteration: int | None = None
        self.last_checkpoint: Path | None = None
        load, save = cfg.checkpoint.load, cfg.checkpoint.save
        if load:
            self.iteration = load_checkpoint(self.state, cfg, self.train_source.restore)
            if self.iteration:
                self.logger.console(f"--load {load}: resumed at iteration {self.iteration}")
                if save and Path(save).resolve() == Path(load).resolve():
                    self.checkpointed_iteration = self.iteration

    # --- one step --------------------------------------------------------------------------

    def _pipeline_shape_fn(self):
        """1F1B stage tensors are ``[text; X]`` (see ``VisionLanguageModel``); None without pipelining."""
        if self.state.pg.pp.size() == 1:
            return None
        d, v = self.cfg.data, self.cfg.model.vision
        shape = self.state.stage.pipeline_tensor_shape(
            d.seq_length, self.cfg.training.micro_batch_size, d.max_images, v.max_num_tiles
        )
        return lambda recv, send: ([shape] * len(recv), [shape] * len(send))

    def _run_schedule(self, batches: list[dict], forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, self.state, family(self.cfg).model_inputs),
            data_iterator=iter(batches),
            model=[self.state.model],
            num_microbatches=len(batches),
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
            adjust_tensor_shapes_fn=self._pipeline_shape_fn(),
        )

    def train_step(self) -> dict:
        """One iteration; a non-finite loss or gradient skips the optimizer step (reported, counted)."""
        s = self.state
        s.model.zero_grad_buffer()
        s.optimizer.zero_grad()
        with self.watchdog.phase("data"), loop_phase("data"):
            batches = self.train_source.micro_batches(self.iteration, self.device)
        with self.watchdog.phase("forward-backward"):
            reports = self._run_schedule(batches, forward_only=False)
            with loop_phase("gradient check"):
                metrics = _reduce_reports(s, reports, self.device, [])
                finite = self._all_finite(metrics["loss"])
        lr = s.optimizer.param_groups[0]["lr"]
        metrics["lr"] = lr
        metrics["bad_samples"] = self.train_source.bad_samples
        if not finite:
            self.skipped_steps += 1
            self.failed_in_a_row += 1
            metrics.update(grad_norm=float("nan"), skipped=True, skipped_steps=self.skipped_steps)
            return metrics
        self.failed_in_a_row = 0
        self.unconfirmed.clear()  # their weights just gave a finite step
        with self.watchdog.phase("optimizer"), loop_phase("optimizer"):
            ok, grad_norm, _ = s.optimizer.step()
        s.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["skipped"] = not ok
        return metrics

    def _on_every_rank(self, local: bool | torch.Tensor) -> bool:
        """Whether ``local`` holds on every rank (one small all-reduce)."""
        flag = torch.as_tensor(local, dtype=torch.float32, device=self.device).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _all_finite(self, loss: float) -> bool:
        """Loss and every local gradient finite, on every rank."""
        local = math.isfinite(loss) and all(
            bool(torch.isfinite(buffer.grad_data).all()) for buffer in self.state.model.buffers
        )
        return self._on_every_rank(local)

    def _weights_finite(self) -> bool:
        """Every parameter finite, on every rank (one device sync per rank)."""
        flags = [torch.isfinite(p).all() for p in self.state.stage.parameters()]
        return self._on_every_rank(torch.stack(flags).all() if flags else True)

    def _stop_diverged(self, reason: str, set_aside: bool) -> NoReturn:
        """Stop the run with one line: ``reason`` and the newest healthy checkpoint. With ``set_aside``, this
        run's checkpoints of the diverged weights (:attr:`unconfirmed`) are renamed ``iter_N.diverged`` and
        the newest checkpoint below them is tracked (collective)."""
        root = self.cfg.checkpoint.save
        if not root:
            raise TrainingDiverged(f"{reason}; no checkpoint.save, so no checkpoint")
        if set_aside and self.unconfirmed:
            names = ", ".join(p.name for p in self.unconfirmed)
            tracked = set_aside_diverged(root, self.unconfirmed)
            self.unconfirmed = []
            said = f"set aside {names} (saved from these weights) as *{DIVERGED}; the newest healthy checkpoint"
        else:
            tracked, said = tracked_iteration(root), "the newest checkpoint"
        newest = f"{said} is {checkpoint_dir(root, tracked)} (tracked)" if tracked is not None else f"{said}: none"
        raise TrainingDiverged(f"{reason}; {newest}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and answer accuracy (per question type too, when the data names types), and
        with ``training.eval_without_vision`` the same answers scored with every frame blanked
        (``novision_*``): how much of the accuracy the frames give."""
        self.state.model.eval()
        prefixes = ("", "novision_") if self.cfg.training.eval_without_vision else ("",)
        reports: dict[str, list[dict]] = {prefix: [] for prefix in prefixes}
        n = self.cfg.training.eval_iters
        for i in range(n):
            batches = self.eval_source.micro_batches(i, self.device, prefetch_next=i + 1 < n)
            for prefix in prefixes:
                if prefix:  # blank frames: what the model answers from the text alone
                    batches = [{**b, "pixel_values": torch.zeros_like(b["pixel_values"])} for b in batches]
                reports[prefix] += self._run_schedule(batches, forward_only=True)
        self.state.model.train()
        types = self.eval_source.question_types
        return {
            prefix + key: value
            for prefix, rows in reports.items()
            for key, value in _reduce_reports(self.state, rows, self.device, types).items()
        }

    # --- the run -----------------------------------------------------------------------------

    def _throughput(self, times: dict[str, float]) -> dict:
        """Rates of the interval's ordinary steps (``StepTimer.interval``; none when it had only sampled
        ones), cross-attention's share of its sampled steps, and memory."""
        cfg = self.cfg
        metrics = {}
        if "step_s" in times:
            seconds = times["step_s"]
            gbs, world = cfg.training.global_batch_size, dist.get_world_size()
            tflops = self.flops_per_sample * gbs / seconds / world / 1e12
            metrics = {
                "step_s": seconds,
                "text_tokens_per_s": gbs * cfg.data.seq_length / seconds,
                "visual_tokens_per_s": gbs * cfg.data.max_images * visual_tokens_per_image(cfg) / seconds,
                "tflops_per_device": tflops,
            }
            if self.peak:
                metrics["mfu"] = tflops * 1e12 / self.peak
        if "xattn_time_share" in times:
            metrics["xattn_time_share"] = times["xattn_time_share"]
        if self.device.type == "cuda":
            metrics["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    def _save(self) -> None:
        """Save a checkpoint of this iteration, unless one is there; non-finite weights stop the run instead."""
        root = self.cfg.checkpoint.save
        if root and self.checkpointed_iteration != self.iteration:
            if not self._weights_finite():
                self._stop_diverged(f"iteration {self.iteration}: the weights are not finite; not saved", True)
            phase = lambda name: self.watchdog.phase(f"checkpoint save ({name})")
            data_state = self.train_source.data_state(self.iteration)
            path = save_checkpoint(self.state, self.cfg, self.iteration, root, phase, data_state)
            self.checkpointed_iteration = self.iteration
            self.last_checkpoint = path
            self.unconfirmed.append(path)
            self.logger.console(f"saved checkpoint {path}")

    def run(self) -> dict:
        """Train to ``train_iters``; returns the last train and eval metrics. Past ``data.max_bad_samples``
        (all ranks agree) the run saves a checkpoint, then stops with a TooManyBadSamples naming it."""
        try:
            return self._train()
        except TooManyBadSamples as exc:
            if not self.cfg.checkpoint.save:
                raise TooManyBadSamples(f"{exc}; checkpoint.save is not set, so the run's work is not saved") from None
            self._save()
            raise TooManyBadSamples(
                f"{exc}; iteration {self.iteration} is saved under {self.cfg.checkpoint.save}: fix the data or raise "
                "data.max_bad_samples, and resume from it"
            ) from None

    def _train(self) -> dict:
        cfg, tr = self.cfg, self.cfg.training
        last_train, last_eval = {}, {}
        self.logger.console(
            f"training {tr.train_iters} iterations from {self.iteration} on {dist.get_world_size()} ranks "
            f"(TP {cfg.parallel.tensor_model_parallel_size}, CP {cfg.parallel.context_parallel_size}, "
            f"PP {cfg.parallel.pipeline_model_parallel_size}, DP {parallel_state.get_data_parallel_world_size()})"
        )
        self.logger.begin(self.iteration, tr.train_iters)
        chance = chance_levels(cfg)
        if chance:
            self.logger.log("data", self.iteration, chance)
        # The handlers cover every save, the final one too: a stop signal during a save lets it finish.
        with (
            DistributedSignalHandler(signal.SIGTERM) as sigterm,
            DistributedSignalHandler(signal.SIGUSR1) as sigusr1,
        ):
            while self.iteration < tr.train_iters:
                logged = (self.iteration + 1) % tr.log_interval == 0 or self.iteration + 1 == tr.train_iters
                self.watchdog.iteration = self.iteration + 1
                self.step_timer.start_step(self.iteration + 1)
                if self.profiler is not None:
                    self.profiler.before_step(self.iteration)
                metrics = self.train_step()
                self.step_timer.end_step()
                self.iteration += 1
                if self.profiler is not None and (profiled := self.profiler.after_step(self.iteration)):
                    print(
                        f"[profile rank {profiled['rank']}] iterations {profiled['iterations'][0]}-"
                        f"{profiled['iterations'][1]}, {profiled['time_source']} per step (trace "
                        f"{profiled['trace']}):\n{profiled['table']}",
                        flush=True,
                    )
                if "skipped_steps" in metrics:
                    self.logger.log("train", self.iteration, metrics)
                    self.logger.console(
                        f"iteration {self.iteration}: non-finite loss or gradients, optimizer step skipped "
                        f"({self.skipped_steps} of at most training.max_skipped_steps = {tr.max_skipped_steps})"
                    )
                    if self.skipped_steps > tr.max_skipped_steps:
                        # One non-finite step may be a bad batch; several in a row from the same weights are
                        # the weights.
                        self._stop_diverged(
                            f"{self.skipped_steps} iterations with non-finite loss or gradients (more than "
                            f"training.max_skipped_steps = {tr.max_skipped_steps}), the last {self.failed_in_a_row} "
                            f"in a row at iteration {self.iteration}",
                            set_aside=self.failed_in_a_row >= 2,
                        )
                    continue
                if logged:
                    metrics.update(self._throughput(self.step_timer.interval()))
                    self.logger.log("train", self.iteration, metrics)
                last_train = metrics
                if tr.eval_interval and self.iteration % tr.eval_interval == 0 and self.iteration < tr.train_iters:
                    self.step_timer.pause()  # evaluation is no step's time
                    with self.watchdog.phase("evaluation"):
                        last_eval = self.evaluate()
                    self.logger.log("eval", self.iteration, last_eval)
                interval = cfg.checkpoint.save_interval
                if interval and self.iteration % interval == 0 and self.iteration < tr.train_iters:
                    self.step_timer.pause()
                    self._save()
                exit_now = tr.exit_interval and self.iteration % tr.exit_interval == 0
                term, usr1 = any(sigterm.signals_received()), any(sigusr1.signals_received())
                if term or usr1 or exit_now:
                    reason = "SIGTERM" if term else "SIGUSR1" if usr1 else f"exit interval {tr.exit_interval}"
                    self.logger.console(f"{reason}: saving a checkpoint and stopping at iteration {self.iteration}")
                    self._save()
                    return {"train": last_train, "eval": last_eval, "iteration": self.iteration, "stopped": True}
            with self.watchdog.phase("evaluation"):
                last_eval = self.evaluate()
            self.logger.log("eval", self.iteration, last_eval)
            if not math.isfinite(last_eval["loss"]):
                self._stop_diverged(
                    f"iteration {self.iteration}: the held-out loss is {last_eval['loss']}; not saved", True
                )
            self._save()
        self._summarize(last_eval, chance)
        return {"train": last_train, "eval": last_eval, "iteration": self.iteration, "stopped": False}

    def _summarize(self, last_eval: dict, chance: dict) -> None:
        """The run's picture (``metrics.png``) and one closing line: accuracy against chance and
        against the frames blanked, the wall time, and where the metrics, checkpoint and W&B run are."""
        if not self.logger.writer:
            return
        out = self.cfg.output_dir
        picture = plot_run(out)
        types = sorted(k.split("/", 1)[1] for k in last_eval if k.startswith("accuracy/"))

        def accuracy(prefix: str) -> float:  # averaged over question types when the data has them
            if not types:
                return last_eval[f"{prefix}accuracy"]
            return sum(last_eval[f"{prefix}accuracy/{t}"] for t in types) / len(types)

        held_out = f"{accuracy(''):.2f}"
        if types:
            per_type = ", ".join(f"{t} {last_eval[f'accuracy/{t}']:.2f}" for t in types)
            held_out += f" averaged over question types ({per_type})"
        parts = [f"held-out accuracy {held_out}"]
        if "chance" in chance:
            parts.append(f"chance {chance['chance']:.2f}")
        if "novision_accuracy" in last_eval:
            parts.append(f"frames blanked {accuracy('novision_'):.2f}")
        places = [f"metrics {out / 'metrics.jsonl'}", f"picture {picture}"]
        if self.last_checkpoint is not None:
            places.append(f"checkpoint {self.last_checkpoint}")
        if self.logger.wandb_dir is not None:
            places.append(f"W&B {self.logger.wandb_dir}")
        self.logger.console(
            f"done in {format_duration(self.logger.elapsed())}: {'; '.join(parts)}. {'; '.join(places)}"
        )

    def close(self) -> None:
        """End the run's helpers and give up its output folder."""
        self.watchdog.close()
        self.train_source.close()
        self.eval_source.close()
        self.logger.close()
        parallel_state.destroy_model_parallel()
        self.lock.release()
