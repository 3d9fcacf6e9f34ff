"""Config, YAML and flag errors: one line naming the field, the file and line, or the flag, with exit
status 2, through the real command line (``pretrain_mllm.py`` and ``python -m lvx_megatron.torchrun``);
the schema rejects everything the model constructors would reject later."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from train_harness import TINY

from lvx_megatron.torchrun import ERROR_FILE_KEY, one_line_errors
from lvx_megatron.training import setup
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.families import mllama, openflamingo, vit
from lvx_megatron.training.layout_check import validate_layout

REPO = TINY.parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _tiny_tree(tmp_path: Path) -> dict:
    tree = yaml.safe_load(TINY.read_text())
    tree["data"].update(path=str(tmp_path / "data"), train_samples=8, eval_samples=4)
    tree["checkpoint"] = {}
    tree["logging"] = {"wandb_mode": "disabled", "run_dir": str(tmp_path / "run")}
    return tree


def _set(tree: dict, dotted: str, value) -> dict:
    tree = copy.deepcopy(tree)
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[leaf] = value
    return tree


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The failed command's error: its last stderr line, which must be its only error line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert sum(line.startswith(("config error", "data error")) for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "pretrain_mllm.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)


MODEL_CASES = [
    (
        "model.text.cross_attention_layers",
        [1, 1],
        "config error: model.text.cross_attention_layers: must be distinct decoder layer indices in "
        "[0, num_layers=4), got [1, 1] (1 repeated)",
    ),
    (
        "model.cross_attention.strategy",
        ["query_ring"],
        "config error: model.cross_attention.strategy: needs one entry per cross-attention layer "
        "(2: model.text.cross_attention_layers = [1, 3]) or a single name, got ['query_ring']",
    ),
    (
        "model.vision.patch_size",
        5,
        "config error: model.vision.patch_size: must divide vision.image_size (32) for architecture 'mllama': "
        "one of [1, 2, 4, 8, 16, 32], got 5",
    ),
    (
        "model.vision.intermediate_layers_indices",
        [0, 2],
        "config error: model.vision.intermediate_layers_indices: must be a non-empty list of local vision "
        "layer indices in [0, vision.num_hidden_layers=2), got [0, 2]",
    ),
    (
        "data.tokenizer",
        "huggingface",
        "config error: data.tokenizer_path: required by tokenizer 'huggingface' (a local transformers tokenizer "
        "folder); the tokenizers without one: words, bytes",
    ),
]


@pytest.mark.parametrize("field, value, expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_config_errors_the_model_would_raise_are_one_line_on_the_command_line(tmp_path, field, value, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_set(_tiny_tree(tmp_path), field, value)))
    assert _one_line_error(_pretrain("--config", str(config))) == expected
    assert not (tmp_path / "data").exists()  # found before any data is generated


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "model:\n  text:\n    cross_attention_layers: [1, 3\n  vision:\n    hidden_size: 32\n",
            "{path}:4:9: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence at line 3)",
        ),
        ("training:\n  lr: 1.0\ndata:\n  seed: 1\ntraining:\n  lr: 2.0\n", "{path}:5:1: not valid YAML: duplicate key"),
    ],
    ids=["unclosed-list", "duplicate-section"],
)
def test_invalid_yaml_names_the_file_and_line(tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = _one_line_error(_pretrain("--config", str(config)))
    assert line.startswith("config error: " + expected.format(path=config)), line


def test_a_misspelt_flag_is_one_line_with_the_closest_flag(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump(_tiny_tree(tmp_path)))
    proc = _pretrain("--config", str(config), "--trian-iters", "5")
    assert _one_line_error(proc) == "config error: --trian-iters: unknown flag (did you mean --train-iters?)"
    assert "usage:" not in proc.stderr


def test_the_launcher_ends_a_failed_run_with_the_one_line_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_set(_tiny_tree(tmp_path), "model.vision.patch_size", 5)))
    command = [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=2", "pretrain_mllm.py"]
    proc = subprocess.run(
        [*command, "--config", str(config)], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )
    assert _one_line_error(proc) == MODEL_CASES[2][2]  # once, although both ranks report it


def test_the_launcher_reports_a_crash_as_torchrun_does(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('rank 1 crashed')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert "RuntimeError: rank 1 crashed" in proc.stderr and "ChildFailedError" in proc.stderr
    assert "failed (exitcode: 1)" in proc.stderr  # torchrun's own log lines are shown for a crash


# Each tool with a bad input: its argv (``{missing}``: a folder that does not exist) and its one error line.
TOOL_ERRORS = {
    "generate": (["--load", "{missing}", "--clip", "c.mp4", "--prompt", "q"], "error: --load: no checkpoint in "),
    "evaluate": (["{missing}"], "error: --load: no checkpoint in "),
    "mllama_forward": (
        ["--load", "{missing}", "--inputs", "{missing}/in.pt", "--output", "{missing}/out.pt"],
        "error: [Errno 2] No such file or directory: ",
    ),
    "convert_hf_checkpoint": (
        ["export", "--load", "{missing}", "--out", "{missing}/hf"],
        "error: --load: no checkpoint",
    ),
    "generate-bad-flag": (
        ["--load", "x", "--clip", "c", "--prompt", "p", "--top-p", "0"],
        "error: argument --top-p: --top-p must be a number in (0, 1]",
    ),
}


@pytest.mark.parametrize("case", TOOL_ERRORS)
def test_every_tool_reports_its_error_through_the_launchers_one_line_path(tmp_path, monkeypatch, capsys, case):
    """As a worker of ``python -m lvx_megatron.torchrun``: the tool's one line goes to its torchelastic error
    file (the launcher prints it and exits with the status, 2), nothing to stderr (it used to print its line,
    then torchrun's failure report followed, exit status 1)."""
    import importlib

    argv, line = TOOL_ERRORS[case]
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("LVX_TORCHRUN", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    main = importlib.import_module(f"tools.{case.removesuffix('-bad-flag')}").main
    try:
        status = main([arg.format(missing=tmp_path / "missing") for arg in argv])
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    assert capsys.readouterr().err == ""
    reported = json.loads(error_file.read_text())
    assert reported[ERROR_FILE_KEY].startswith(line) and "\n" not in reported[ERROR_FILE_KEY], reported
    failure = SimpleNamespace(exitcode=status, error_file_data=reported)
    assert one_line_errors({0: failure, 1: failure}) == ([reported[ERROR_FILE_KEY]], 2)


def test_a_tool_under_the_launcher_ends_with_its_one_line_and_status_2(tmp_path):
    command = [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=2", "tools/generate.py"]
    args = ["--load", str(tmp_path / "missing"), "--clip", "c.mp4", "--prompt", "q"]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"error: --load: no checkpoint in {tmp_path / 'missing'} (no latest_checkpointed_iteration.txt)"]


def _failure(exitcode: int, line: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, error_file_data={ERROR_FILE_KEY: line} if line else {})


@pytest.mark.parametrize(
    "failures, expected",
    [
        ({0: _failure(2, "config error: a"), 1: _failure(2, "config error: a")}, (["config error: a"], 2)),
        (
            {0: _failure(-15), 1: _failure(2, "data error: b"), 2: _failure(2, "data error: c")},
            (["data error: b", "data error: c"], 2),
        ),
        # rank 0 reported, then the agent stopped it before it exited: its line, rank 1's status
        ({0: _failure(-15, "config error: a"), 1: _failure(2, "config error: a")}, (["config error: a"], 2)),
        ({0: _failure(2, "config error: a"), 1: _failure(1)}, None),  # a crash next to it: torchrun's report
        ({0: _failure(-11)}, None),  # a segfault
        ({0: _failure(-15), 1: _failure(-9)}, None),  # only stopped workers: nothing to print
    ],
    ids=[
        "same-line-on-every-rank",
        "stopped-rank-and-two-lines",
        "stopped-after-reporting",
        "crash",
        "signal",
        "only-stopped",
    ],
)
def test_which_failures_end_with_one_line_errors(failures, expected):
    assert one_line_errors(failures) == expected


# Values around each model field's valid range; every combination the schema accepts must build.
MUTATIONS = {
    "model.text.num_layers": [1, 2, 3],
    "model.text.cross_attention_layers": [[0], [3], [1, 1], [3, 1], [0, 4], [-1]],
    "model.text.num_query_groups": [1, 3, 4, 8],
    "model.text.num_attention_heads": [2, 3, 8],
    "model.cross_attention.strategy": [["query_ring"], ["kv_ring", "q_allgather"], ["auto", "auto", "auto"], []],
    "model.vision.hidden_size": [24, 30],
    "model.vision.attention_heads": [3, 5],
    "model.vision.num_hidden_layers": [1, 3],
    "model.vision.image_size": [24, 30, 8, 4],
    "model.vision.patch_size": [3, 5, 16, 32, 33],
    "model.vision.intermediate_layers_indices": [[], [1], [2], [-1], [0, 0]],
    "model.vision.feature_layer": [-1, -2, -3, -4],
    "model.vision.num_global_layers": [0, 2],
}
ARCH_CONFIGS = [TINY, TINY.parent / "tiny-openflamingo.yaml", TINY.parent / "tiny-mplug-owl3.yaml"]


# The model configs each family builds from the run config (they validate again).
FAMILY_MODEL_CONFIGS = {
    "mllama": lambda cfg: [mllama.vision_config(cfg)],
    "openflamingo": lambda cfg: [vit.vit_config(cfg, "clip"), openflamingo.perceiver_config(cfg)],
    "mplug_owl3": lambda cfg: [vit.vit_config(cfg, "siglip")],
}


def _model_configs(cfg) -> None:
    setup.transformer_config(cfg)
    FAMILY_MODEL_CONFIGS[cfg.model.architecture](cfg)


@pytest.mark.parametrize("config", ARCH_CONFIGS, ids=lambda p: p.stem)
def test_what_the_schema_accepts_the_model_builds(config):
    """Every mutated config either fails validation with a one-line error, or its model configs build."""
    accepted = 0
    for field, values in MUTATIONS.items():
        for value in values:
            try:
                cfg = load_config(config, {field: value})
                p = cfg.parallel
                validate_layout(
                    cfg, p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
                )
            except ConfigError as exc:
                assert "\n" not in str(exc) and str(exc).startswith("config error: "), str(exc)
                continue
            try:
                _model_configs(cfg)
            except ValueError as exc:
                pytest.fail(f"{config.name} with {field} = {value!r} passed validation, then the model raised: {exc}")
            accepted += 1
    assert accepted > 10  # the mutations also cover valid values


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("training.lr", float("inf"), "config error: training.lr: Input should be a finite number (got inf)"),
        ("training.lr", float("nan"), "config error: training.lr: Input should be a finite number (got nan)"),
        ("training.lr", 0.0, "config error: training.lr: Input should be greater than 0 (got 0.0)"),
        ("training.min_lr", float("inf"), "config error: training.min_lr: Input should be a finite number (got inf)"),
        ("training.min_lr", -1e-4, "config error: training.min_lr: Input should be greater than or equal to 0"),
    ],
    ids=["lr-inf", "lr-nan", "lr-zero", "min_lr-inf", "min_lr-negative"],
)
def test_a_learning_rate_must_be_finite_and_positive(field, value, expected):
    """Before, ``lr: inf`` was accepted and the first step wrote non-finite weights."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, {field: value})
    assert str(err.value).startswith(expected), str(err.value)


def test_an_infinite_lr_flag_is_one_line(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump(_tiny_tree(tmp_path)))
    line = _one_line_error(_pretrain("--config", str(config), "--lr", "inf"))
    assert line == "config error: training.lr: Input should be a finite number (got inf)"


def test_the_two_lr_schedule_flags_exclude_each_other(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump(_tiny_tree(tmp_path)))
    flags = ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler")
    line = _one_line_error(_pretrain("--config", str(config), *flags))
    assert line.startswith(
        "config error: checkpoint.use_checkpoint_opt_param_scheduler: cannot be combined with "
        "override_opt_param_scheduler"
    ), line
