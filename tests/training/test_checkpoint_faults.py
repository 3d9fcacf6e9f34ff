"""Fault injection on checkpoints, against every loader of training checkpoints.

One tiny training run saves ``iter_0000002`` and ``iter_0000004``; every case damages its own copy
(each file kind missing, truncated or bit-flipped; the tracker ahead of or behind the folders; no
manifests at all; a checkpoint of another model or LR schedule; a save killed at each step; a disk
that fills while each file is written) and runs the trainer's loader,
``tools/convert_hf_checkpoint.py export`` and ``tools/mllama_forward.py`` on it, in one gloo worker
(see ``checkpoint_harness.py``). Each outcome is either a one-line error naming the file or field,
or a fallback that prints what it skipped and why, which checkpoint it used and why, and whose
output (weights, exported tensors, logits) equals the intact checkpoint's exactly.
"""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_harness import EXPORT_VOCAB, TOOLS, TRACKER, fault_matrix, flip_a_weight, full_disk_on_rank
from safetensors.torch import load_file
from train_harness import TINY

from lvx_megatron.launch import spawn_gloo

LOADERS = ("train", "export", "forward")
NEWEST, OLDER, NEW = "iter_0000004", "iter_0000002", "iter_0000006"
FILES = {  # every file kind of a checkpoint (megatron-core's torch_dist format keeps its common state in the .distcp)
    "__0_0.distcp": f"{NEWEST}/__0_0.distcp",
    ".metadata": f"{NEWEST}/.metadata",
    "metadata.json": f"{NEWEST}/metadata.json",
    "manifest.json": f"{NEWEST}/manifest.json",
    TRACKER: TRACKER,
}
FAULTS = ("missing", "truncated", "bitflip")
# What every loader says when it falls back from the damaged newest checkpoint: which one it uses and why.
FALLBACK = f"/{OLDER} (iteration 2): fallback from {NEWEST} (not intact)"


def _file_expectation(name: str, fault: str) -> tuple[str, list[str]]:
    """The reference the loaders' output equals and what they print, for ``name`` damaged by ``fault``."""
    if name == TRACKER:
        says = {
            "missing": f"{TRACKER} is missing; using the newest intact checkpoint",
            "truncated": f"{TRACKER} does not hold an iteration number ('': damaged?); using the newest intact",
            "bitflip": "iter_0000005 is not intact (the folder is missing); trying an older one",  # "4" -> "5"
        }
        if fault == "bitflip":
            return "iter_4", [says[fault], f"{NEWEST} (iteration 4): fallback from iter_0000005 (not intact)"]
        return "iter_4", [says[fault], f"{NEWEST} (iteration 4): the newest intact checkpoint ({TRACKER} "]
    if name == "manifest.json":
        says = {
            # Every save writes one: beside checkpoints that have one, a missing manifest is damage.
            "missing": f"{NEWEST} is not intact (manifest.json is missing, while {OLDER} has one (deleted or",
            "truncated": f"{NEWEST} is not intact (manifest.json is unreadable or not valid JSON",
            "bitflip": f"{NEWEST} is not intact (manifest.json is unreadable or not valid JSON",
        }
        return "iter_2", [says[fault], FALLBACK]
    says = {
        "missing": f"{name} is missing",
        "truncated": f"{name} has",
        "bitflip": f"{name} fails its CRC-32 check against manifest.json (corrupted)",
    }
    return "iter_2", [f"{NEWEST} is not intact ({says[fault]}", "trying an older one", FALLBACK]


# Save steps in order (lvx_megatron.training.checkpointing.save_checkpoint), with kills inside the
# writes of the data file and of torch's metadata among them.
KILLS = (
    ("prepare", {"kill": "prepare"}),
    ("write", {"kill": "write"}),
    ("writing-distcp", {"kill_writing": "__0_0.distcp"}),
    ("writing-metadata", {"kill_writing": ".metadata"}),
    ("manifest", {"kill": "manifest"}),
    ("set-aside", {"kill": "set aside"}),
    ("publish", {"kill": "publish"}),
    ("tracker", {"kill": "tracker"}),
    ("rotate", {"kill": "rotate"}),
)
FULL_DISK = {
    name: {"full_disk": name} for name in ("__0_0.distcp", ".metadata", "metadata.json", "manifest.json", TRACKER)
}
# Inside a tensor's record torch's writer loses the errno: "[enforce fail at inline_container.cc:672] . unexpected
# pos 704 vs 598" (the disk filled at that byte of the file).
FULL_DISK["__0_0.distcp-inside-a-tensor"] = {"full_disk": "__0_0.distcp", "room": 1_000_000}
# Changes that the trainer's loader must refuse (one line naming each changed field, checkpoint -> this run).
SMALLER = {"model.text.num_layers": 3, "model.text.cross_attention_layers": [1], "model.vision.num_hidden_layers": 1}
LARGER = {  # 11 architectural fields: 10 named, then the count
    "model.text.num_layers": 5,
    "model.text.hidden_size": 128,
    "model.text.ffn_hidden_size": 512,
    "model.text.num_attention_heads": 8,
    "model.text.num_query_groups": 4,
    "model.text.cross_attention_layers": [1, 3, 4],
    "model.vision.hidden_size": 32,
    "model.vision.num_hidden_layers": 3,
    "model.vision.num_global_layers": 2,
    "model.vision.attention_heads": 2,
    "model.vision.intermediate_size": 64,
}
# A new schedule from iteration 4 of the 4-iteration run: 8 iterations at twice the learning rate.
SCHEDULE = {"training.lr": 0.01, "training.train_iters": 8}


def _cases() -> list[dict]:
    cases = [{"id": f"{name}-{fault}", "damage": [(path, fault)]} for name, path in FILES.items() for fault in FAULTS]
    cases += [
        {"id": "none-intact", "damage": [(FILES["__0_0.distcp"], "truncated"), (f"{OLDER}/__0_0.distcp", "bitflip")]},
        {"id": "tracker-ahead", "tracker": "6"},
        {"id": "tracker-behind", "tracker": "2"},
        {"id": "other-model", "overrides": {"model.text.hidden_size": 128}, "loaders": ("train",)},
        {"id": "other-model-cli", "cli": {"overrides": {"model.text.hidden_size": 128}}, "loaders": ()},
        {"id": "smaller-model", "overrides": SMALLER, "loaders": ("train",)},
        {"id": "larger-model", "overrides": LARGER, "loaders": ("train",)},
        {
            "id": "same-weights-other-semantics",
            "overrides": {"model.cross_attention.blind_rows": "attend_all"},
            "loaders": ("train",),
        },
        {"id": "older-save", "older_save": 6, "overrides": {"model.text.rotary_base": 500000.0}, "loaders": ("train",)},
        {"id": "schedule-changed", "overrides": SCHEDULE, "loaders": ("train",)},
        {
            "id": "schedule-override",
            "overrides": {**SCHEDULE, "checkpoint.override_opt_param_scheduler": True},
            "loaders": ("train",),
        },
        {
            "id": "schedule-of-the-checkpoint",
            "overrides": {**SCHEDULE, "checkpoint.use_checkpoint_opt_param_scheduler": True},
            "loaders": ("train",),
        },
        {
            "id": "no-manifests",
            "damage": [(f"{NEWEST}/manifest.json", "missing"), (f"{OLDER}/manifest.json", "missing")],
        },
        {
            "id": "no-manifests-allowed",
            "damage": [(f"{NEWEST}/manifest.json", "missing"), (f"{OLDER}/manifest.json", "missing")],
            "flags": ["--allow-unverified"],
            "loaders": ("export", "forward"),
        },
        {
            "id": "full-disk-cli",
            "cli": {
                "overrides": {"training.train_iters": 5, "checkpoint.use_checkpoint_opt_param_scheduler": True},
                "full_disk": "__0_0.distcp",
            },
        },
    ]
    for name, spec in KILLS:
        cases.append({"id": f"kill-new-{name}", "save": {"iteration": 6, **spec}})
        damaged = [(FILES["__0_0.distcp"], "bitflip")]  # the save replaces the damaged folder of its iteration
        cases.append({"id": f"kill-replace-{name}", "damage": damaged, "save": {"iteration": 4, **spec}})
    cases += [{"id": f"full-disk-{name}", "save": {"iteration": 6, **spec}} for name, spec in FULL_DISK.items()]
    damaged = [(FILES["__0_0.distcp"], "bitflip")]  # the run resumed at 2 and saves 3 with keep_last 2
    cases.append({"id": "rotate-below-a-damaged-newer", "damage": damaged, "save": {"iteration": 3, "keep_last": 2}})
    for fault in ("missing", "bitflip"):
        damaged = [(NEWEST if fault == "missing" else FILES["__0_0.distcp"], fault)]
        resume = {"training.train_iters": 4, "checkpoint.save_interval": 2}
        cases.append({"id": f"resume-newest-{fault}", "damage": damaged, "resume": resume, "loaders": ()})
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def results(root) -> dict:
    """Every case's outcome; ``root/base`` holds iterations 2 and 4 of a 4-iteration tiny run."""
    return spawn_gloo(1, fault_matrix, str(root), CASES)[0]


def _result(results: dict, case: str) -> dict:
    result = results[case]
    assert "crash" not in result, result["crash"]
    return result


def _loaded(outcome: dict, loader: str, weights: str, says: list[str]) -> None:
    """The loader ran (no error, no traceback), printed each of ``says`` and its output equals ``weights``."""
    assert outcome["error"] is None and "Traceback" not in outcome["stderr"], outcome
    if loader != "train":
        assert outcome["rc"] == 0, outcome
    for text in says:
        assert text in outcome["stdout"], (text, outcome["stdout"])
    assert outcome["weights"] == weights, outcome["stdout"]
    if loader == "train" and weights != "saved":
        assert outcome["iteration"] == int(weights.removeprefix("iter_")), outcome


def _refused(outcome: dict, loader: str, says: list[str]) -> None:
    """A one-line error containing each of ``says``: the trainer's ConfigError, the tools' stderr line."""
    if loader == "train":
        kind, message = outcome["error"]
        assert kind == "ConfigError" and "\n" not in message, outcome
    else:
        assert outcome["rc"] == 2 and "Traceback" not in outcome["stderr"], outcome
        lines = [line for line in outcome["stderr"].splitlines() if line.startswith("error:")]
        assert len(lines) == 1, outcome["stderr"]
        message = lines[0]
    for text in says:
        assert text in message, (text, message)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", list(FILES))
def test_a_damaged_file_is_reported_and_the_newest_intact_checkpoint_is_used(results, name, fault, loader):
    weights, says = _file_expectation(name, fault)
    _loaded(_result(results, f"{name}-{fault}")[loader], loader, weights, says)


@pytest.mark.parametrize("loader", LOADERS)
def test_no_intact_checkpoint_is_a_one_line_error_naming_each_problem(results, loader):
    setting = "checkpoint.load" if loader == "train" else "--load"
    says = [
        f"config error: {setting}: no intact checkpoint under",
        f"{NEWEST}: __0_0.distcp has",
        f"{OLDER}: __0_0.distcp fails its CRC-32 check",
    ]
    _refused(_result(results, "none-intact")[loader], loader, says)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_tracker_ahead_of_the_folders_falls_back(results, loader):
    says = [f"{NEW} is not intact (the folder is missing); trying an older one"]
    _loaded(_result(results, "tracker-ahead")[loader], loader, "iter_4", says)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_tracker_behind_the_folders_is_obeyed_and_the_newer_ones_are_named(results, loader):
    says = [f"{NEWEST} under", "are newer than the tracker's iteration 2; not used"]
    _loaded(_result(results, "tracker-behind")[loader], loader, "iter_2", says)


ANOTHER_MODEL = "holds another model than this run's (checkpoint -> this run): "


def test_a_checkpoint_of_another_model_is_a_one_line_error(results):
    says = ["config error: checkpoint.load: ", ANOTHER_MODEL + "model.text.hidden_size 96 -> 128; use the checkpoint's"]
    _refused(_result(results, "other-model")["train"], "train", says)
    cli = _result(results, "other-model-cli")["cli"]
    lines = [line for line in cli["stderr"].splitlines() if line.startswith("config error")]
    assert cli["exit"] == 2 and "Traceback" not in cli["stderr"], cli
    assert len(lines) == 1 and all(text in lines[0] for text in says), cli["stderr"]


def test_a_smaller_or_larger_model_is_refused_naming_every_changed_field(results):
    """Before, the smaller model loaded without a word (extra weights dropped), the larger one failed with a
    28 KB line listing every missing key."""
    smaller = (
        "model.text.num_layers 4 -> 3, model.text.cross_attention_layers [1, 3] -> [1], "
        "model.vision.num_hidden_layers 2 -> 1; "
    )
    _refused(_result(results, "smaller-model")["train"], "train", [ANOTHER_MODEL + smaller])
    outcome = _result(results, "larger-model")["train"]
    _refused(
        outcome,
        "train",
        [ANOTHER_MODEL + "model.text.num_layers 4 -> 5, model.text.hidden_size 96 -> 128", " and 1 more; "],
    )
    _, message = outcome["error"]
    assert message.count(" -> ") == 11 and len(message) < 1000, message  # 10 fields and the "checkpoint -> this run"


def test_a_change_that_keeps_the_weights_is_said_and_an_older_checkpoint_is_not_checked(results):
    said = "this run changes model.cross_attention.blind_rows 'zero' -> 'attend_all' (checkpoint -> this run)"
    _loaded(_result(results, "same-weights-other-semantics")["train"], "train", "iter_4", [said])
    said = "holds no run config (saved by an older version): the architecture check was skipped"
    _loaded(_result(results, "older-save")["train"], "train", "saved", [said])


def test_a_changed_lr_schedule_is_refused_unless_megatron_s_flag_chooses_one(results):
    """Before, a changed --lr crashed in megatron's distributed optimizer (a 93-line KeyError) and a changed
    --train-iters silently kept the checkpoint's schedule."""
    tiny = yaml.safe_load(TINY.read_text())["training"]
    lr, min_lr = tiny["lr"], tiny["min_lr"]  # the checkpoint's
    says = [
        "config error: checkpoint.load: this run's LR schedule differs from the checkpoint's iter_0000004 "
        f"(checkpoint -> this run): training.lr {lr} -> 0.01, training.train_iters 4 -> 8; pass "
        "--override-opt_param-scheduler",
        "--use-checkpoint-opt_param-scheduler",
    ]
    _refused(_result(results, "schedule-changed")["train"], "train", says)
    # Megatron-LM's semantics at iteration 4 (1 warm-up iteration, cosine to min_lr): this run's schedule
    # over 8 iterations from 0.01, or the checkpoint's, which ended at iteration 4.
    override = _result(results, "schedule-override")["train"]
    _loaded(override, "train", "iter_4", [f"the LR schedule changed (training.lr {lr} -> 0.01", "using this run's"])
    assert override["lr"] == pytest.approx(min_lr + (0.01 - min_lr) * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    kept = _result(results, "schedule-of-the-checkpoint")["train"]
    _loaded(kept, "train", "iter_4", ["using the checkpoint's"])
    assert kept["lr"] == pytest.approx(min_lr)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_checkpoint_set_without_manifests_trains_and_the_tools_refuse_it_unless_allowed(results, loader):
    """Checkpoints saved before manifests existed: training resumes from them (said), the tools export or
    compute from them only with --allow-unverified."""
    outcome = _result(results, "no-manifests")[loader]
    unverified = f"{NEWEST} (iteration 4): the tracker's; unverified: no checkpoint under"
    if loader == "train":
        _loaded(outcome, loader, "iter_4", [unverified])
        return
    _refused(outcome, loader, ["error: --load: ", f"{NEWEST} has no manifest.json", "pass --allow-unverified"])
    _loaded(_result(results, "no-manifests-allowed")[loader], loader, "iter_4", [unverified])


def _kill_expectation(scenario: str, kill: str) -> tuple[str, list[str]]:
    """What the loaders use after a save was killed entering step ``kill``."""
    if scenario == "new":  # saving iteration 6 next to the tracked, intact iteration 4
        if kill == "rotate":
            return "saved", []
        return "iter_4", [f"{NEW} under", "newer than the tracker's iteration 4"] if kill == "tracker" else []
    # Saving iteration 4 over its damaged folder: until the new folder is in place, iteration 2 is used.
    if kill in ("tracker", "rotate"):
        return "saved", []
    reason = "the folder is missing" if kill == "publish" else "__0_0.distcp fails its CRC-32 check"
    return "iter_2", [f"{NEWEST} is not intact ({reason}"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kill", [name for name, _ in KILLS])
@pytest.mark.parametrize("scenario", ["new", "replace"])
def test_a_save_killed_at_any_step_leaves_a_loadable_folder_and_the_next_save_succeeds(results, scenario, kill, loader):
    result = _result(results, f"kill-{scenario}-{kill}")
    iteration = 6 if scenario == "new" else 4
    assert result["save"]["error"][0] == "Killed", result["save"]
    assert result["save"]["tracker"] == ("6" if scenario == "new" and kill == "rotate" else "4")
    weights, says = _kill_expectation(scenario, kill)
    _loaded(result[loader], loader, weights, says)
    resave = result["resave"]
    assert resave["error"] is None and resave["problem"] is None, resave
    assert resave["tracker"] == str(iteration)
    assert not [n for n in resave["listing"] if n.endswith((".saving", ".replaced", ".tmp"))], resave["listing"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", list(FULL_DISK))
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(root, results, name, loader):
    result = _result(results, f"full-disk-{name}")
    save = result["save"]
    kind, message = save["error"]
    assert kind == "CheckpointSaveError" and "\n" not in message, save
    assert f"could not save {root / 'work' / 'case' / NEW}: " in message and "No space left on device" in message
    assert f"{TRACKER} still names {NEWEST}" in message and save["tracker"] == "4", message
    leftovers = [n for n in save["listing"] if n.endswith((".saving", ".replaced", ".tmp"))]
    assert not leftovers, save["listing"]
    published = name == TRACKER  # the checkpoint was complete and in place when the tracker's write failed
    assert (NEW in save["listing"]) == published, save["listing"]
    says = [f"{NEW} is complete but not tracked"] if published else [f"removed the unfinished {NEW}.saving"]
    assert all(text in message for text in says), message
    _loaded(result[loader], loader, "iter_4", [])
    assert result["resave"]["error"] is None and result["resave"]["problem"] is None, result["resave"]


def test_a_full_disk_on_another_rank_is_the_same_one_line_error_on_every_rank(root, results):
    """megatron reports a rank's failed write to the others without its cause: the ranks share it."""
    _result(results, "full-disk-cli")  # the matrix has run: base/ exists
    outcomes = spawn_gloo(2, full_disk_on_rank, str(root), 1)
    for outcome in outcomes:
        kind, message = outcome["error"]
        assert kind == "CheckpointSaveError" and "\n" not in message, outcome
        assert f"{NEW}: " in message and "No space left on device" in message, message
        assert f"{TRACKER} still names {NEWEST}" in message and outcome["tracker"] == "4", message
        assert not [n for n in outcome["listing"] if n.startswith(NEW)], outcome["listing"]


def test_a_full_disk_stops_the_training_command_with_one_line_and_status_1(results):
    result = _result(results, "full-disk-cli")
    cli = result["cli"]
    lines = [line for line in cli["stderr"].splitlines() if line.startswith("checkpoint error")]
    assert cli["exit"] == 1 and "Traceback" not in cli["stderr"], cli
    assert len(lines) == 1 and "iter_0000005: " in lines[0] and "No space left on device" in lines[0], cli["stderr"]
    assert cli["tracker"] == "4" and not [n for n in cli["listing"] if n.startswith("iter_0000005")], cli["listing"]
    for loader in LOADERS:
        _loaded(result[loader], loader, "iter_4", [])


@pytest.mark.parametrize("loader", LOADERS)
def test_rotation_keeps_the_runs_own_checkpoints_below_a_newer_damaged_one(results, loader):
    """keep_last counts the checkpoints up to the one saved: a damaged or stale newer folder (which this run
    replaces when it gets there) must not push out the run's intact fallback."""
    result = _result(results, "rotate-below-a-damaged-newer")
    assert result["save"]["error"] is None and result["save"]["tracker"] == "3", result["save"]
    assert {OLDER, "iter_0000003", NEWEST} <= set(result["save"]["listing"]), result["save"]["listing"]
    _loaded(result[loader], loader, "saved", [f"{NEWEST} under", "newer than the tracker's iteration 3"])


@pytest.mark.parametrize("fault", ["missing", "bitflip"])
def test_a_run_resumed_below_a_broken_newest_checkpoint_saves_that_iteration_again(root, results, fault):
    """Before, the save at the tracker's iteration was skipped: the run ended without its final checkpoint."""
    resume = _result(results, f"resume-newest-{fault}")["resume"]
    assert resume["error"] is None, resume
    assert "resumed at iteration 2" in resume["stdout"], resume["stdout"]
    assert f"saved checkpoint {root / 'work' / 'case' / NEWEST}\n" in resume["stdout"], resume["stdout"]
    assert resume["tracker"] == "4" and NEWEST in resume["listing"]
    assert resume["reloaded_equal"], "the checkpoint saved at iteration 4 does not hold the trained weights"
    assert resume["reloaded_iteration"] == 4 and "not intact" not in resume["reloaded_stdout"], resume


def test_export_command_line_falls_back_from_a_corrupted_weight(root, results):
    """The reported bug end to end: before, exit 0 and the damaged weight in the safetensors."""
    _result(results, "__0_0.distcp-bitflip")  # the matrix has run: base/ and the fallback's export exist
    ckpt = root / "cli_bitflip"
    shutil.copytree(root / "base", ckpt)
    flip_a_weight(ckpt / NEWEST, "embedding.word_embeddings.weight")
    out = root / "cli_export"
    argv = ["export", "--load", str(ckpt), "--out", str(out), "--vocab-size", str(EXPORT_VOCAB)]
    done = subprocess.run(
        [sys.executable, str(TOOLS / "convert_hf_checkpoint.py"), *argv], capture_output=True, text=True
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{NEWEST} is not intact (__0_0.distcp fails its CRC-32 check" in done.stdout, done.stdout
    exported = load_file(out / "model.safetensors")
    fallback = load_file(root / "work" / "export_iter_2" / "model.safetensors")
    assert exported.keys() == fallback.keys() and all(torch.equal(exported[k], fallback[k]) for k in exported)
