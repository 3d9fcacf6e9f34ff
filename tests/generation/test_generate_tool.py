"""``tools/generate.py`` end to end: a short ``pretrain_mllm.py`` run on the tiny config saves a
checkpoint; the README's command (two ranks, CP 2) streams the Python API's answer about a clip;
bad input gets one error line naming the flag."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_harness import TOOL_TOKENS, parse_error, train_and_answer
from train_harness import TINY

from lvx_megatron.data.video import write_clip
from lvx_megatron.data.video_qa import VideoQAGenerator
from lvx_megatron.launch import spawn_gloo
from tools.generate import main, parse_args

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "does any frame show blue?"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generate_tool")
    clip = root / "clip.mp4"
    write_clip(str(clip), VideoQAGenerator(2, 4, 32, split="eval")[1]["frames"])
    answer = spawn_gloo(1, train_and_answer, str(root / "data"), str(root / "run"), str(clip), QUESTION)[0]
    return {"root": root, "clip": clip, "run": root / "run", "answer": answer}


def _tool(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lvx_megatron.torchrun", f"--nproc-per-node={nproc}", "tools/generate.py"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_the_readme_command_prints_the_api_answer(run):
    done = _tool("--load", str(run["run"]), "--clip", str(run["clip"]), "--prompt", QUESTION,
                 "--max-new-tokens", str(TOOL_TOKENS))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert run["answer"]  # a real answer, not just eos
    assert f"Q: {QUESTION}\nA: {run['answer']}\n" in done.stdout
    assert f"checkpoint: using {run['run'] / 'iter_0000002'} (iteration 2): the tracker's\n" in done.stdout
    assert "mllama from" in done.stderr and "(TP 1, CP 2), 4 frames" in done.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--load", "x", "--clip", "c", "--prompt", "p", "--top-p", "0"], r"--top-p must be a number in (0, 1]"),
        (["--load", "x", "--clip", "c", "--prompt", "p", "--temperature", "-1"], "--temperature must be a number in"),
        (
            ["--load", "x", "--clip", "c", "--prompt", "p", "--max-new-tokens", "0"],
            "--max-new-tokens must be a positive",
        ),
        (["--load", "x", "--prompt", "p"], "one of the arguments --clip --frames is required"),
        (["--load", "x", "--clip", "c", "--prompt", ""], "--prompt must not be empty or only white space, got ''"),
        (["--load", "x", "--clip", "c", "--prompt", " \t"], "--prompt must not be empty or only white space"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys):
    assert message in parse_error(parse_args, argv, capsys)


def test_bad_inputs_get_one_error_line(run, capsys):
    clip, load = str(run["clip"]), str(run["run"])
    assert main(["--load", str(run["root"] / "none"), "--clip", clip, "--prompt", QUESTION]) == 2
    assert "error: --load: no checkpoint in" in capsys.readouterr().err
    assert main(["--load", load, "--clip", str(run["root"] / "missing.mp4"), "--prompt", QUESTION]) == 2
    assert "error: --clip: " in capsys.readouterr().err
    assert main(["--load", load, "--clip", clip, "--prompt", "what is a dog?"]) == 2
    assert "error: --prompt: word 'what' is not in the WordTokenizer vocabulary" in capsys.readouterr().err
    assert main(["--load", load, "--clip", clip, "--prompt", QUESTION, "--num-frames", "9"]) == 2
    assert "error: --num-frames must be at most data.max_images (4), got 9" in capsys.readouterr().err


LONG_PROMPT = " ".join([QUESTION] * 5)  # 30 question tokens: with 4 frames and bos, 35 > data.seq_length = 24


def test_a_prompt_past_the_sequence_length_is_an_error_or_truncated(run, capsys):
    """It used to run for minutes and answer nothing; now one line naming both lengths, or with
    --truncate-prompt a warning and an answer."""
    argv = ["--load", str(run["run"]), "--clip", str(run["clip"]), "--max-new-tokens", str(TOOL_TOKENS)]
    assert main([*argv, "--prompt", LONG_PROMPT]) == 2
    err = capsys.readouterr().err
    assert "error: --prompt: the prompt is 35 tokens (4 frames, bos and the question), longer than the run's " \
        "sequence length data.seq_length = 24; shorten it, or pass --truncate-prompt" in err, err  # fmt: skip
    assert main([*argv, "--prompt", LONG_PROMPT, "--truncate-prompt"]) == 0
    out = capsys.readouterr()
    assert "warning: --truncate-prompt: the prompt is 35 tokens, longer than data.seq_length = 24: its first 11 " \
        "question tokens are dropped" in out.err and f"Q: {LONG_PROMPT}\nA: " in out.out, out  # fmt: skip


def test_a_truncated_prompt_is_the_prompt_of_its_last_tokens():
    """``build_prompts(max_length=...)`` drops the question's first tokens: the same tokens, mask and images as
    the prompt of the question's end (the image tokens and bos stay)."""
    from lvx_megatron.data.tokenizer import build_tokenizer
    from lvx_megatron.generation import build_prompts
    from lvx_megatron.training.config import load_config

    cfg, tokenizer = load_config(TINY), build_tokenizer("words")
    frames = VideoQAGenerator(2, 4, 32, split="eval")[1]["frames"]
    end = " ".join(["does any frame show red ?"] * 3) + " blue"  # 19 tokens: 4 frames + bos + 19 = 24
    cut = build_prompts(cfg, tokenizer, [{"frames": frames, "question": f"how many frames {end}"}], max_length=24)
    whole = build_prompts(cfg, tokenizer, [{"frames": frames, "question": end}])
    assert cut.tokens.shape == (1, 24) and torch.equal(cut.tokens, whole.tokens)
    assert torch.equal(cut.prompt_mask, whole.prompt_mask) and cut.images.keys() == whole.images.keys()
    assert all(torch.equal(cut.images[k], whole.images[k]) for k in whole.images)


def test_frames_instead_of_a_clip(run, capsys):
    from PIL import Image

    frames = VideoQAGenerator(2, 4, 32, split="eval")[1]["frames"]
    paths = [str(run["root"] / f"frame{i}.png") for i in range(len(frames))]
    for frame, path in zip(frames, paths, strict=True):
        Image.fromarray(frame).save(path)
    argv = ["--load", str(run["run"]), "--prompt", QUESTION, "--max-new-tokens", str(TOOL_TOKENS), "--frames"]
    assert main([*argv, *paths]) == 0
    assert f"Q: {QUESTION}\nA: " in capsys.readouterr().out
    Image.fromarray(frames[0][:16]).save(paths[0])
    assert main([*argv, *paths]) == 2
    assert "error: --frames: the images must have one size" in capsys.readouterr().err
