"""The run directory: an overwrite deletes only what a run writes (its manifest, RUN_FILES), and
only once every input has been read; an output directory that is empty, or that is or holds one
of the run's inputs, is refused in one line before anything is written (issue 29, item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cskd.cli import main
from cskd.training.rundir import RUN_FILES


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` with its bytes, every link with its target (not followed)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


@pytest.fixture
def finished_run(tmp_path, tiny_run) -> Path:
    """A finished tiny run in tmp_path/run."""
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    return tmp_path / "run"


def test_a_run_writes_only_names_of_its_manifest(finished_run):
    written = {path.name for path in finished_run.iterdir()}
    assert written <= set(RUN_FILES), written - set(RUN_FILES)
    assert {"last.pt", "student.safetensors", "train.log", "metrics.jsonl"} <= written


def test_an_overwrite_deletes_only_the_runs_own_files_and_no_link_target(
    tmp_path, finished_run, tiny_run
):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    (elsewhere / "inner" / "keep.txt").write_text("not the run's")
    (finished_run / "notes.txt").write_text("the user's notes")
    (finished_run / "data").mkdir()
    (finished_run / "data" / "table.csv").write_text("1,2\n")
    (finished_run / "linked").symlink_to(elsewhere, target_is_directory=True)
    # one of the run's own names as a link to a directory: the link goes, its target stays
    for item in sorted((finished_run / "tensorboard").rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    (finished_run / "tensorboard").rmdir()
    (finished_run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    outside_before = tree(elsewhere)

    overwrite = {"optim.epochs": 1, "optim.warmup_epochs": 0, "train.overwrite": True}
    assert main(["train", *tiny_run(**overwrite)]) == 0
    assert (finished_run / "notes.txt").read_text() == "the user's notes"
    assert (finished_run / "data" / "table.csv").read_text() == "1,2\n"
    assert (finished_run / "linked").is_symlink()
    assert tree(elsewhere) == outside_before
    assert (finished_run / "student.safetensors").is_file()
    assert not (finished_run / "tensorboard").is_symlink()  # the new run's own folder


def test_an_overwrite_that_fails_on_an_input_leaves_the_previous_run_whole(
    tmp_path, finished_run, tiny_run, capsys
):
    before = tree(finished_run)
    failing = {"train.overwrite": True, "teacher.checkpoint": tmp_path / "absent.pth"}
    assert main(["train", *tiny_run(**failing)]) == 2
    assert "absent.pth" in error_line(capsys)
    after = tree(finished_run)
    log = after.pop("train.log")
    assert log.startswith(before.pop("train.log"))  # the failed attempt's lines appended
    assert after == before


def test_an_overwrite_keeps_only_the_new_runs_log_lines(finished_run, tiny_run):
    first = (finished_run / "train.log").read_text()
    overwrite = {"optim.epochs": 1, "optim.warmup_epochs": 0, "train.overwrite": True}
    assert main(["train", *tiny_run(**overwrite)]) == 0
    log = (finished_run / "train.log").read_text()
    assert first not in log and log.count("finished") == 1, log


@pytest.mark.parametrize("where", ["teacher_dir", "cache", "initial_weights", "data_root"])
def test_an_output_dir_that_is_or_holds_an_input_is_refused_before_anything_is_written(
    tmp_path, tiny_run, teacher_checkpoint, capsys, where
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "final_metrics.json").write_text("{}")  # as if a run had been there too
    extra: dict = {"train.overwrite": True, "train.output_dir": inputs}
    if where == "teacher_dir":
        (inputs / "teacher.pth").write_bytes(Path(teacher_checkpoint).read_bytes())
        extra["teacher.checkpoint"] = inputs / "teacher.pth"
        key = "teacher.checkpoint"
    elif where == "cache":
        (inputs / "cache.json").write_text("{}")
        (inputs / "shard-00000.safetensors").write_bytes(b"shard")
        extra["teacher.cache"] = inputs
        key = "teacher.cache"
    elif where == "initial_weights":
        (inputs / "weights.safetensors").write_bytes(b"weights")
        extra["student.checkpoint"] = inputs / "weights.safetensors"
        key = "student.checkpoint"
    else:
        (inputs / "train" / "a").mkdir(parents=True)
        (inputs / "train" / "a" / "0.png").write_bytes(b"png")
        extra.update({"data.dataset": "folder", "data.root": inputs})
        key = "data.root"
    before = tree(inputs)
    assert main(["train", *tiny_run(**extra)]) == 2
    line = error_line(capsys)
    assert key in line and "train.output_dir" in line, line
    assert tree(inputs) == before


def test_a_run_dir_inside_a_folder_datasets_root_is_refused(tmp_path, tiny_run, capsys):
    root = tmp_path / "images"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    overrides = {"data.dataset": "folder", "data.root": root}
    assert (
        main(["train", *tiny_run(**overrides, **{"train.output_dir": root / "train" / "run"})]) == 2
    )
    line = error_line(capsys)
    assert "data.root" in line and "train.output_dir" in line, line
    assert not (root / "train" / "run").exists()


def test_an_empty_output_dir_is_refused_and_the_current_directory_untouched(
    tmp_path, tiny_run, capsys, monkeypatch
):
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "project" / "main.py").write_text("print('mine')")
    (work / "final_metrics.json").write_text("{}")  # looks like a run's
    monkeypatch.chdir(work)
    before = tree(work)
    assert main(["train", *tiny_run(**{"train.output_dir": "", "train.overwrite": True})]) == 2
    line = error_line(capsys)
    assert "train.output_dir" in line and "empty" in line, line
    assert tree(work) == before
