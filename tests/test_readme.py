"""The README can be followed to the letter: its set-up, its demo and its Python example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cskd.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A quick demo in ``<tmp>/runs/demo``, as ``bash scripts/demo.sh --quick`` makes it; its
    printed output."""
    root = tmp_path_factory.mktemp("readme")
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["demo", "--quick", "--output-dir", str(root / "runs" / "demo")]) == 0
    return root, printed.getvalue()


def test_demo_quick_prints_the_table_beside_the_readmes(demo):
    root, out = demo
    assert "| ViT student, CSKD |" in out and "| teacher (CNN, supervised) |" in out
    assert (root / "runs" / "demo" / "cskd" / "student.safetensors").is_file()
    assert "README" in out and "torch thread" in out


def test_the_readme_python_example_runs_on_the_demo_outputs(demo, monkeypatch):
    root, _ = demo
    block = README.split("On the demo's outputs", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    monkeypatch.chdir(root)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the README's own example
    assert names["t"].dense_logits.shape == (8, 10, 4, 4)
    assert names["s"].patch_logits.shape == (8, 16, 10)
    assert names["prediction"].shape == (8, 10) and torch.isfinite(names["loss"])
    # the teacher's mean/std came from its file (the demo's 1-channel Fashion-MNIST values)
    assert names["teacher"].input_mean.flatten().tolist() == pytest.approx([0.286])


def test_the_readme_demo_table_is_the_one_the_demo_compares_with():
    from cskd.commands.demo import README_TABLE

    for title, cells in README_TABLE.items():
        shown = " | ".join(f"{value:.2f}" if value is not None else "-" for value in cells)
        assert f"| {title} | {shown} |" in README, title


def test_the_set_up_says_how_to_reach_the_commands_and_builds_without_warnings():
    setup = (ROOT / "scripts" / "setup.sh").read_text().strip().splitlines()
    assert "source .venv/bin/activate" in setup[-1]
    set_up_section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in set_up_section
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "[^"]+"$', pyproject, re.M)  # SPDX: a table makes a warning
    assert re.search(r"CSKD_TORCH_INDEX", set_up_section)
