"""Real ``cskd train`` / ``cskd eval`` runs of a few steps on synthetic data, and what they write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import HANG, TINY_STUDENT
from safetensors.torch import load_file

from cskd.cli import main
from cskd.method.adapters import DenseStudent, combine_heads


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_train_writes_every_output_and_eval_reproduces_the_last_epoch(tmp_path, tiny_run, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_run()]) == 0
    for name in ["config.yaml", "metrics.jsonl", "train.log", "last.pt", "best.pt"]:
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "student.safetensors").is_file()
    assert not list(run_dir.glob("*.tmp")), "a temporary checkpoint was left behind"

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["distill"]["method"] == "cskd" and saved["data"]["num_classes"] == 4

    steps, epochs = _records(run_dir, "step"), _records(run_dir, "epoch")
    assert len(epochs) == 2
    for key in ["loss", "base", "token", "cskd", "local_weight", "lr", "images_per_s"]:
        assert key in steps[0], key
    assert steps[0]["local_weight"] == 1.0 and epochs[-1]["train"]["local_weight"] == 0.5

    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    for key in ["student", "ema", "optimizer", "scheduler", "scaler", "state", "rng", "config"]:
        assert key in checkpoint, key
    assert checkpoint["state"]["epoch"] == 2 and checkpoint["state"]["global_step"] == 8
    assert checkpoint["teacher"]["name"] == "resnet18"
    assert not any(k.startswith(("teacher", "model.")) for k in checkpoint["student"])
    assert set(checkpoint["config"]) == set(saved)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir / "last.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    logged = epochs[-1]["eval"]
    for rule in ["cls", "cls+dist", "cls+dist+patch"]:
        assert evaluated[rule] == logged[rule], rule
        assert evaluated["ema"][rule] == logged["ema"][rule], rule
    assert evaluated["images"] == logged["images"] == 8

    # overrides apply to the checkpoint's own config
    overrides = ["data.eval_batch_size=3", "train.eval_max_batches=1"]
    assert main(["eval", "--checkpoint", str(run_dir / "last.pt"), *overrides]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3


def test_resume_continues_with_the_same_losses_as_the_uninterrupted_run(
    tmp_path, teacher_checkpoint
):
    from conftest import tiny_overrides

    full, parts = tmp_path / "full", tmp_path / "parts"
    common = {"train.log_interval": 1, "optim.epochs": 3}
    assert main(["train", *tiny_overrides(full, teacher_checkpoint, **common)]) == 0
    # stop mid-epoch (step 5 of 4-step epochs), then resume from last.pt
    stopped = tiny_overrides(parts, teacher_checkpoint, **common, **{"train.stop_after_steps": 5})
    assert main(["train", *stopped]) == 0
    assert torch.load(parts / "last.pt", weights_only=True)["state"]["global_step"] == 5
    assert not (parts / "student.safetensors").exists()
    resumed = tiny_overrides(parts, teacher_checkpoint, **common, **{"train.resume": "auto"})
    assert main(["train", *resumed]) == 0
    expected = {r["step"]: r["loss"] for r in _records(full, "step")}
    got = {r["step"]: r["loss"] for r in _records(parts, "step")}
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert got[6] == expected[6], "the first step after resuming differs"
    assert got == expected
    final_full = load_file(str(full / "student.safetensors"))
    final_parts = load_file(str(parts / "student.safetensors"))
    for key, value in final_full.items():
        torch.testing.assert_close(final_parts[key], value, rtol=0, atol=0)


def test_exported_student_loads_into_plain_timm_with_the_same_logits(tmp_path, tiny_run):
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    kwargs = dict(pretrained=False, num_classes=4, in_chans=3, **TINY_STUDENT)
    plain = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs).eval()
    plain.load_state_dict(load_file(str(tmp_path / "run" / "student.safetensors")))
    trained = DenseStudent(timm.create_model("deit_tiny_distilled_patch16_224", **kwargs)).eval()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["student"]
    trained.load_state_dict(state)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), combine_heads(trained(images), "cls+dist"))
    assert not torch.allclose(
        plain.head.weight,
        timm.create_model("deit_tiny_distilled_patch16_224", **kwargs).head.weight,
    )


# ------------------------------------------------------------------ learning-rate schedule


def test_min_lr_above_the_scaled_peak_is_refused_in_one_line_and_writes_nothing(tmp_path, tiny_run):
    """lr 5e-4 per 512 images at a batch of 8 peaks at 7.8e-6, under min_lr 1e-5: the cosine
    would climb from the peak to min_lr, silently. One line, exit status 2, no run left."""
    import subprocess
    import sys

    overrides = tiny_run(
        **{"optim.lr": 5e-4, "optim.lr_batch_reference": 512, "optim.min_lr": 1e-5}
    )
    result = subprocess.run(
        [sys.executable, "-m", "cskd", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "optim.min_lr=1e-05" in lines[0]
        and "7.81e-06" in lines[0]
        and "lower optim.min_lr" in lines[0]
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"optim.lr": 1e-6, "optim.min_lr": 1e-5}, "optim.min_lr"),  # a fine-tuning lr
        ({"optim.lr": 1e-6, "optim.min_lr": 0.0, "optim.warmup_lr": 1e-5}, "optim.warmup_lr"),
    ],
)
def test_check_lr_schedule_names_the_setting_that_reaches_the_peak(overrides, key):
    from cskd.config import load_config
    from cskd.errors import ConfigError
    from cskd.training.build import check_lr_schedule

    values = {"optim.lr_batch_reference": 8, **overrides}
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    with pytest.raises(ConfigError, match=key):
        check_lr_schedule(config.optim, 8)
    assert check_lr_schedule(load_config(None, ["optim.lr=1e-3"]).optim, 512) == 1e-3


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_learning_rate_warms_up_then_only_decays(tmp_path, tiny_run, unit):
    overrides = {"optim.epochs": 4, "optim.warmup_epochs": 1, "train.log_interval": 1}
    assert main(["train", *tiny_run(**overrides, **{"optim.schedule_unit": unit})]) == 0
    steps = _records(tmp_path / "run", "step")
    rates = [record["lr"] for record in steps]
    peak = rates.index(max(rates))
    assert 0.5 * 7.8125e-6 < max(rates) <= 7.8125e-6  # tiny_run's peak: 5e-4 x 8 / 512
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))  # never climbs back
    per_epoch = {}
    for record in steps:
        per_epoch.setdefault(record["epoch"], set()).add(record["lr"])
    if unit == "epoch":  # DeiT's: one rate per epoch, the warm-up epoch at warmup_lr
        assert all(len(rates) == 1 for rates in per_epoch.values())
        assert per_epoch[0] == {1e-6}
    else:
        assert len(per_epoch[0]) > 1  # warm-up step by step


# ------------------------------------------------------------------ final metrics


def test_final_metrics_give_the_last_and_the_best_epoch_per_rule_raw_and_ema(tmp_path, tiny_run):
    assert main(["train", *tiny_run(**{"optim.epochs": 3})]) == 0
    run_dir = tmp_path / "run"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    epochs = _records(run_dir, "epoch")
    assert final["last_epoch"]["epoch"] == 3  # counted from 1, as train.log counts
    assert final["last_epoch"]["cls+dist+patch"] == epochs[-1]["eval"]["cls+dist+patch"]
    assert final["last_epoch"]["ema"] == epochs[-1]["eval"]["ema"]
    for rule in ("cls", "cls+dist", "cls+dist+patch"):
        for best, key in (
            (final["best_epoch"], lambda e: e["eval"]),
            (final["best_epoch"]["ema"], lambda e: e["eval"]["ema"]),
        ):
            values = [key(record)[rule]["top1"] for record in epochs]
            assert best[rule]["top1"] == max(values)
            assert best[rule]["epoch"] == values.index(max(values)) + 1
            assert best[rule]["top5"] == key(epochs[best[rule]["epoch"] - 1])[rule]["top5"]
    assert "best_epoch" in final["note"] and "release" in final["note"]
    log = (run_dir / "train.log").read_text()
    assert "at the last epoch (3), best" in log
    rule = "cls+dist+patch"
    best = final["best_epoch"][rule]
    assert f"best {best['top1']:.2f} at epoch {best['epoch']} (" in log  # the same count


def test_eval_interval_and_the_official_test_split_beside_a_held_out_validation_split(
    tmp_path, tiny_run
):
    overrides = {
        "optim.epochs": 3,
        "train.eval_interval": 2,
        "train.eval_test": "true",
        "data.val_split": 8,  # 8 of the 32 synthetic training images held out
    }
    assert main(["train", *tiny_run(**overrides)]) == 0
    run_dir = tmp_path / "run"
    epochs = _records(run_dir, "epoch")
    assert [("eval" in r, "test" in r) for r in epochs] == [
        (False, False),
        (True, True),
        (True, True),
    ]
    assert epochs[1]["eval"]["images"] == 8  # the held-out split
    assert epochs[1]["test"]["images"] == 8  # the official split (synthetic: a quarter, min 8)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test_last_epoch"] == epochs[-1]["test"]
    assert final["last_epoch"]["cls"] == epochs[-1]["eval"]["cls"]
    assert {v["epoch"] for v in final["best_epoch"].values() if "epoch" in v} <= {2, 3}


def test_eval_test_without_a_held_out_split_is_refused():
    from cskd.config import load_config
    from cskd.errors import ConfigError

    with pytest.raises(ConfigError, match="train.eval_test=true needs data.val_split"):
        load_config(None, ["train.eval_test=true"])


def test_the_first_step_after_resuming_with_another_batch_runs_at_the_new_schedule(
    tmp_path, tiny_run, monkeypatch
):
    """The learning rate logged after a step is the next one's; this records the rate each
    optimizer step actually used, and checks the first step after the resume against a
    schedule built for the new batch at that position."""
    from cskd.config import load_config
    from cskd.training.build import build_optimization, scaled_lr
    from cskd.training.engine import Trainer
    from cskd.training.models import build_student

    common = {"optim.epochs": 3, "train.log_interval": 1}
    assert main(["train", *tiny_run(**common, **{"train.stop_after_steps": 3})]) == 0
    used = []
    step = Trainer.step

    def recording(self, batch, state):
        used.append((state.epoch, state.step_in_epoch, self.optimizer.param_groups[0]["lr"]))
        return step(self, batch, state)

    monkeypatch.setattr(Trainer, "step", recording)
    bigger = {**common, "train.resume": "auto", "data.batch_size": 16}
    assert main(["train", *tiny_run(**bigger)]) == 0
    # 32 images: 4 steps of 8 per epoch before, 2 steps of 16 now; step 3 of epoch 0 (24
    # images) resumes at step 1 of 2 (resume_step rounds down to whole new batches)
    epoch, step_in_epoch, lr = used[0]
    assert (epoch, step_in_epoch) == (0, 1)
    config = load_config(None, tiny_run(**bigger))
    _, scheduler = build_optimization(
        config.optim, build_student(config), lr=scaled_lr(config.optim, 16), steps_per_epoch=2
    )
    scheduler.step_update(num_updates=epoch * 2 + step_in_epoch)
    assert lr == pytest.approx(scheduler.optimizer.param_groups[0]["lr"])


def test_persistent_loader_workers_train_the_same_student_as_none(tmp_path, teacher_checkpoint):
    """Two loader workers that live across both epochs (one DataLoader, iterated per epoch)
    give the very weights of a run without workers: every sample is seeded on its own."""
    from conftest import tiny_overrides

    import cskd.data.sampling

    loaders = []
    original = cskd.data.sampling.DataLoader

    def recording(*args, **kwargs):
        loaders.append(kwargs)
        return original(*args, **kwargs)

    runs = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        overrides = tiny_overrides(run_dir, teacher_checkpoint, **{"data.workers": workers})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cskd.data.sampling, "DataLoader", recording)
            assert main(["train", *overrides, "data.prefetch_factor=3"]) == 0
        runs[workers] = load_file(run_dir / "student.safetensors")
    train_loaders = [kwargs for kwargs in loaders if kwargs.get("drop_last")]
    assert len(train_loaders) == 2, "one training loader per run, not one per epoch"
    assert train_loaders[1]["persistent_workers"] and train_loaders[1]["prefetch_factor"] == 3
    for key, value in runs[0].items():
        assert torch.equal(value, runs[2][key]), key
