"""The Slurm launchers against fake `srun`/`scontrol`: the torchrun command lines for 1 and 4 nodes,
the container flags, extra flags, and checkpoint-then-requeue on SIGUSR1; the local launcher."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
echo "scontrol $*" >> "$FAKE_RECORD/scontrol"
"""
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_RECORD/srun.args"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|NCCL_DEBUG|CUDA_DEVICE_MAX_CONNECTIONS)=' | sort > "$FAKE_RECORD/srun.env"
if [[ -n "${FAKE_SRUN_SLEEP:-}" ]]; then
    trap 'echo TERM >> "$FAKE_RECORD/srun.signals"; exit 143' TERM
    touch "$FAKE_RECORD/srun.started"
    for _ in $(seq 600); do sleep 0.1; done
fi
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def env(nodes: int, **extra) -> dict:
        hosts = [f"gpu{i:03d}" for i in range(1, nodes + 1)]
        return {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_RECORD": str(record),
            "FAKE_HOSTS": " ".join(hosts),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "xattn-run",
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
            "SLURM_GPUS_ON_NODE": "8",
            "REPO_DIR": str(REPO),
            "RUN_ROOT": str(tmp_path / "runs"),
            **extra,
        }

    return tmp_path, record, env


def _srun_args(record: Path) -> list[str]:
    return (record / "srun.args").read_text().splitlines()


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(
    "script, nodes, config",
    [
        ("llama-3.2-11b-vision.sbatch", 1, "examples/configs/llama-3.2-11b-vision.yaml"),
        ("llama-3.2-90b-vision.sbatch", 4, "examples/configs/llama-3.2-90b-vision.yaml"),
    ],
)
def test_torchrun_command_line(slurm, script, nodes, config):
    tmp, record, env = slurm
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm" / script)], cwd=tmp, env=env(nodes), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    args = _srun_args(record)
    torchrun = args.index("python")
    assert args[:torchrun] == [f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={REPO}"]
    assert args[torchrun : torchrun + 9] == [
        "python",
        "-m",
        "lvx_megatron.torchrun",
        f"--nnodes={nodes}",
        "--nproc-per-node=8",
        "--rdzv-id=4242",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu001:{20000 + 4242}",
        "pretrain_mllm.py",
    ]
    checkpoints = str(tmp / "runs" / "xattn-run" / "checkpoints")
    assert _value(args, "--config") == config
    assert _value(args, "--save") == _value(args, "--load") == checkpoints  # a requeued job resumes there
    assert _value(args, "--wandb-exp-name") == "xattn-run"
    assert _value(args, "--wandb-save-dir") == str(tmp / "runs" / "xattn-run")  # same W&B run id after requeue
    assert (record / "srun.env").read_text().splitlines() == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "MASTER_ADDR=gpu001",
        f"MASTER_PORT={20000 + 4242}",
        "NCCL_DEBUG=WARN",
    ]


def test_container_and_extra_flags(slurm):
    tmp, record, env = slurm
    extra = {"CONTAINER_IMAGE": "/images/lvx.sqsh", "EXTRA_ARGS": "--train-iters 20 --lr 2e-5", "MASTER_PORT": "6000"}
    script = REPO / "examples" / "slurm" / "llama-3.2-11b-vision.sbatch"
    subprocess.run(["bash", str(script)], cwd=tmp, env=env(2, **extra), check=True, capture_output=True)
    args = _srun_args(record)
    assert "--container-image=/images/lvx.sqsh" in args and f"--container-workdir={REPO}" in args
    assert args[-4:] == ["--train-iters", "20", "--lr", "2e-5"]
    assert "--rdzv-endpoint=gpu001:6000" in args


def test_sigusr1_checkpoints_then_requeues(slurm):
    tmp, record, env = slurm
    script = REPO / "examples" / "slurm" / "llama-3.2-11b-vision.sbatch"
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp, env=env(1, FAKE_SRUN_SLEEP="1"), text=True)
    deadline = time.time() + 30
    while not (record / "srun.started").exists():
        assert time.time() < deadline and proc.poll() is None, "srun never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    assert (record / "srun.signals").read_text().split() == ["TERM"]  # training saves on SIGTERM
    assert (record / "scontrol").read_text().splitlines() == ["scontrol requeue 4242"]


def test_local_launcher_runs_torchrun_standalone(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_RECORD"\n')
    fake.chmod(0o755)
    record = tmp_path / "args"
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin", "NPROC": "3", "FAKE_RECORD": str(record)}
    # The launcher prefers the project's venv python; hide it by running a copy of the repo layout.
    repo = tmp_path / "repo"
    (repo / "examples").mkdir(parents=True)
    (repo / "examples" / "run_local.sh").write_text((REPO / "examples" / "run_local.sh").read_text())
    subprocess.run(
        ["bash", str(repo / "examples" / "run_local.sh"), "examples/configs/tiny.yaml", "--train-iters", "5"],
        env=env,
        check=True,
    )
    assert record.read_text().splitlines() == [
        "-m",
        "lvx_megatron.torchrun",
        "--standalone",
        "--nproc-per-node=3",
        "pretrain_mllm.py",
        "--config",
        "examples/configs/tiny.yaml",
        "--train-iters",
        "5",
    ]
