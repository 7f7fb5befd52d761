"""Checkpoint files (cskd.infra.checkpoint): a write never leaves a partial file under the real
name, whatever stops it; reading is covered with the run in tests/training/test_reliability.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import HANG

from cskd.infra.checkpoint import read_file, save_atomic


def test_a_write_the_file_system_refuses_keeps_the_previous_checkpoint(tmp_path):
    """The real failure path: torch's own writer hitting an OS limit (RLIMIT_FSIZE stands in for
    a full disk; both make write() fail), which torch reports as an opaque RuntimeError."""
    path = tmp_path / "last.pt"
    script = (
        "import resource, signal, sys, torch\n"
        "from cskd.infra.checkpoint import CheckpointError, save_atomic\n"
        "save_atomic({'w': torch.arange(10.0)}, sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    save_atomic({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except CheckpointError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=HANG
    )
    assert f"could not write checkpoint {path}: File too large" in result.stdout, result.stderr
    assert torch.equal(read_file(path)["w"], torch.arange(10.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_atomic_never_leaves_a_partial_file_under_the_real_name(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def interrupted(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # any exception, even one that is not an error

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
