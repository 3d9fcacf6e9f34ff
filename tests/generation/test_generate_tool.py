"""``tools/generate.py`` end to end: a short ``pretrain_mllm.py`` run on the tiny config saves a
checkpoint; the README's command (two ranks, CP 2) streams the Python API's answer about a clip;
bad input gets one error line naming the flag."""

import subprocess
import sys
from pathlib import Path

import pytest
from generation_harness import TOOL_TOKENS, parse_error, train_and_answer

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
