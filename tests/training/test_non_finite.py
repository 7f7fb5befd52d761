"""Nothing non-finite is saved, exported, evaluated or trained towards (issue 29, items 2-3):
non-finite config values, weights that turn NaN after an update, a teacher whose outputs are not
finite (online or from a cache), and ``cskd eval`` of such weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cskd.cli import main
from cskd.config import load_config
from cskd.errors import ConfigError
from cskd.teacher.store import file_sha256
from cskd.training import engine
from cskd.training.state import read_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def all_finite(tensors: dict) -> bool:
    return all(
        torch.isfinite(value).all() for value in tensors.values() if value.is_floating_point()
    )


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_a_non_finite_number_in_a_recipe_is_refused(value):
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        load_config(CONFIGS / "fashion_mnist/cskd.yaml", [f"optim.lr={value}"])


def poison_weights_after(monkeypatch, step: int) -> None:
    """The student's weights turn NaN in the update of ``step`` (as an exploding update does)."""
    original = engine.Trainer.step

    def step_then_poison(self, batch, state):
        parts = original(self, batch, state)
        if state.global_step == step:
            with torch.no_grad():
                next(engine.unwrap(self.distiller.student).parameters()).fill_(float("nan"))
        return parts

    monkeypatch.setattr(engine.Trainer, "step", step_then_poison)


@pytest.mark.parametrize("log_interval", [1, 100])
def test_weights_that_turn_non_finite_stop_the_run_before_any_checkpoint_holds_them(
    tmp_path, tiny_run, monkeypatch, capsys, log_interval
):
    poison_weights_after(monkeypatch, 3)
    run = {"train.checkpoint_interval": 1, "train.log_interval": log_interval, "train.ema": True}
    assert main(["train", *tiny_run(**run)]) == 2
    line = error_line(capsys)
    assert "not finite" in line and "step 3" in line, line
    assert "last.pt holds step 2" in line, line
    run_dir = tmp_path / "run"
    last = read_checkpoint(run_dir / "last.pt")
    assert last["state"]["global_step"] == 2
    assert all_finite(last["student"]) and all_finite(last["ema"])
    assert not (run_dir / "student.safetensors").exists()
    assert not (run_dir / "best.pt").exists()  # the first evaluation is at step 4


def test_weights_non_finite_at_the_first_step_say_that_no_checkpoint_exists(
    tmp_path, tiny_run, monkeypatch, capsys
):
    poison_weights_after(monkeypatch, 1)
    one_step = {"optim.epochs": 1, "optim.warmup_epochs": 0, "data.synthetic_size": 8}
    assert main(["train", *tiny_run(**one_step)]) == 2
    line = error_line(capsys)
    assert "no checkpoint was written" in line, line
    assert not any((tmp_path / "run" / name).exists() for name in ("best.pt", "last.pt"))
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_a_non_finite_loss_names_the_checkpoint_that_holds_the_run(
    tmp_path, tiny_run, monkeypatch, capsys
):
    from cskd.method.distiller import Distiller

    forward, calls = Distiller.forward, []

    def nan_at_step_3(self, *args, **kwargs):
        loss, parts = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(Distiller, "forward", nan_at_step_3)
    assert main(["train", *tiny_run(**{"train.checkpoint_interval": 1})]) == 2
    line = error_line(capsys)
    assert "non-finite loss at step 3" in line, line
    assert "last.pt holds step 2" in line and "the last checkpoint is untouched" not in line, line


def test_cskd_eval_refuses_weights_that_are_not_finite(tmp_path, tiny_run, capsys):
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    exported = tmp_path / "run" / "student.safetensors"
    with safe_open(str(exported), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(exported))
    name = next(key for key, value in tensors.items() if value.is_floating_point())
    tensors[name][..., 0] = float("inf")
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(poisoned), metadata=metadata)
    capsys.readouterr()
    overrides = [arg for arg in tiny_run() if not arg.startswith("train.output_dir")]
    assert main(["eval", "--checkpoint", str(poisoned), *overrides]) == 2
    line = error_line(capsys)
    assert str(poisoned) in line and "not finite" in line and name in line, line


def test_a_teacher_with_non_finite_weights_stops_the_run_in_one_line(
    tmp_path, tiny_run, teacher_checkpoint, capsys
):
    state = torch.load(teacher_checkpoint)
    state["fc.weight"][0, 0] = float("nan")
    broken = tmp_path / "teacher_nan.pth"
    torch.save(state, broken)
    assert main(["train", *tiny_run(**{"teacher.checkpoint": broken})]) == 2
    line = error_line(capsys)
    assert "teacher" in line and str(broken) in line and "not finite" in line, line
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_a_cache_shard_of_non_finite_logits_is_refused_naming_the_shard(tmp_path, tiny_run, capsys):
    cache = tmp_path / "cache"
    args = tiny_run(**{"teacher.cache": cache, "teacher.cache_shard_size": 8})
    assert main(["cache", *args]) == 0
    shard = cache / "shard-00001-logits.npy"
    logits = np.load(shard)
    logits[0, 0, 0, 0] = np.nan
    np.save(shard, logits)
    # the digests recomputed, as a hostile or buggy writer would leave them
    record_path = cache / "shard-00001.json"
    record = json.loads(record_path.read_text())
    record["files"][shard.name] = file_sha256(shard)
    record_path.write_text(json.dumps(record))
    header = json.loads((cache / "cache.json").read_text())
    header["shards"][1]["files"][shard.name] = file_sha256(shard)
    (cache / "cache.json").write_text(json.dumps(header))
    capsys.readouterr()
    assert main(["train", *args]) == 2
    line = error_line(capsys)
    assert str(shard) in line and "not finite" in line, line


def test_teacher_outputs_that_turn_non_finite_mid_run_stop_it_naming_the_teacher(
    tmp_path, tiny_run, monkeypatch, capsys
):
    """Finite weights whose outputs overflow (as float16 logits can): caught at the step, under
    hard targets too, where the loss stays finite (argmax(NaN) is class 0)."""
    online, calls = engine.Trainer.online_teacher, []

    def overflowing(self, images):
        output = online(self, images)
        calls.append(1)
        if len(calls) == 2:
            output.global_logits[0, 0] = float("inf")
        return output

    monkeypatch.setattr(engine.Trainer, "online_teacher", overflowing)
    assert main(["train", *tiny_run(**{"train.checkpoint_interval": 1})]) == 2
    line = error_line(capsys)
    assert "the teacher resnet18" in line and "not finite at step 2" in line, line
    assert "last.pt holds step 1" in line, line


@pytest.mark.parametrize("kwargs", ["{img_size:32, patch_size: 4}", "{img_size: 32, depth: null}"])
def test_model_kwargs_that_timm_would_drop_silently_are_refused(kwargs):
    """YAML reads ``{img_size:32}`` (no space after the colon) as the key ``img_size:32`` with
    the value null, and timm's create_model drops None-valued keyword arguments: the student
    would silently be built at its default size."""
    with pytest.raises(ConfigError, match="student.kwargs"):
        load_config(CONFIGS / "fashion_mnist/cskd.yaml", [f"student.kwargs={kwargs}"])


def test_weights_that_diverge_without_nan_are_caught_by_their_outputs(tmp_path, tiny_run, capsys):
    """optim.lr=1e30: one update leaves weights near 1e28, finite, whose outputs are NaN. A
    one-step run exited 0 and reported top-1 at chance; a longer one named a checkpoint of
    those weights as untouched."""
    one_step = {"optim.lr": 1e30, "optim.epochs": 1, "optim.warmup_epochs": 0}
    assert main(["train", *tiny_run(**one_step, **{"data.synthetic_size": 8})]) == 2
    line = error_line(capsys)
    assert "outputs are not finite" in line and "no checkpoint was written" in line, line
    run_dir = tmp_path / "run"
    assert not any((run_dir / name).exists() for name in ("best.pt", "student.safetensors"))

    every_step = {"train.checkpoint_interval": 1, "train.overwrite": True, "optim.epochs": 3}
    assert main(["train", *tiny_run(**{**one_step, **every_step})]) == 2
    line = error_line(capsys)
    assert "non-finite loss at step 2" in line, line
    assert "last.pt holds step 1, the weights that failed" in line, line
