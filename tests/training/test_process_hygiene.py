"""The suite's check (tests/conftest.py) that every process a test starts ends with the test."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

LEAKY_TESTS = """
import subprocess

def test_leaves_a_child_running():
    subprocess.Popen(["sleep", "61"])

def test_leaves_an_orphan_running():
    subprocess.run(["bash", "-c", "sleep 62 &"], check=True)  # bash exits; its sleep is re-parented

def test_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)
"""


def test_a_test_that_leaves_a_process_running_fails_and_the_process_is_killed(tmp_path):
    shutil.copy(Path(__file__).resolve().parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_leaky.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LVX_TEST_EXIT_GRACE_S": "0.5"},
    )
    assert proc.returncode == 1, proc.stdout
    assert "3 passed, 2 errors" in proc.stdout, proc.stdout  # the leaking tests fail at teardown
    for test, command in (("test_leaves_a_child_running", "sleep 61"), ("test_leaves_an_orphan_running", "sleep 62")):
        assert f"ERROR test_leaky.py::{test} - Failed: the test left" in proc.stdout, proc.stdout
        assert re.search(rf"the test left 1 process\(es\) running: pid \d+: {command}\n", proc.stdout), proc.stdout
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] in (["sleep", "61"], ["sleep", "62"])]
    assert not leftovers  # the check killed what the tests left
