"""requirements/lock.txt pins the environment that make setup and CI install, and nothing floats past it."""

import importlib.metadata
import os
import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, eq, version = line.partition("==")
            assert eq and version, f"{path.name}: {line!r} is not NAME==VERSION"
            assert _norm(name) not in pins, f"{path.name} pins {name} twice"
            pins[_norm(name)] = version
    return pins


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_dependency_within_pyprojects_ranges():
    pins = _pins(LOCK)
    for req in _direct_requirements():
        assert _norm(req.name) in pins, f"{LOCK.name} pins no {req.name}: run make lock"
        version = pins[_norm(req.name)]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req}"
    for name in ("torch", "triton", "transformers", "numpy", "megatron-core", "megatron-energon", "av", "ruff"):
        assert _norm(name) in pins


def test_the_installed_environment_is_the_locked_one():
    """What this test run imports is what the lock pins (make setup installs with it), local labels aside.

    Each package as imports find it (the first on ``sys.path``): setuptools puts its own vendored copies of a
    few packages on the path behind the installed ones."""
    pins = _pins(LOCK)
    differ = []
    for name in sorted({_norm(d.metadata["Name"]) for d in importlib.metadata.distributions()} & set(pins)):
        version = importlib.metadata.version(name)
        if version.split("+")[0] != pins[name]:
            differ.append(f"{name} {version} (lock {pins[name]})")
    assert not differ, f"installed versions differ from {LOCK.name}: {', '.join(differ)}; run make setup"


def test_the_cluster_image_pins_agree_with_the_lock():
    pins = _pins(LOCK)
    for name, version in _pins(REPO / "requirements" / "cluster.txt").items():
        assert pins.get(name) == version, f"requirements/cluster.txt {name}=={version}, lock {pins.get(name)}"


def test_the_gpu_wheels_are_the_locked_versions():
    out = subprocess.run(
        ["bash", "scripts/fetch_gpu_wheels.sh", "--pins"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    pins = _pins(LOCK)
    assert out and all(pins[_norm(p.split("==")[0])] == p.split("==")[1] for p in out), out
    assert any(p.startswith("megatron-core==") for p in out)


def test_the_gpu_wheels_script_names_a_package_the_lock_lacks(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(line + "\n" for line in LOCK.read_text().splitlines() if "pydantic==" not in line))
    proc = subprocess.run(
        ["bash", "scripts/fetch_gpu_wheels.sh", "--pins"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LVX_LOCK": str(lock)},
    )
    assert proc.returncode != 0 and "pins no pydantic (make lock)" in proc.stderr


def test_setup_rejects_an_unknown_torch_source():
    proc = subprocess.run(
        ["bash", "scripts/setup_env.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LVX_TORCH": "conda"},
    )
    assert proc.returncode == 2 and "LVX_TORCH=conda: expected auto, cpu or pypi" in proc.stderr
