"""The benchmarks' --quick modes run end to end and write their results, report and plot."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG

from cskd.errors import USER_ERRORS
from cskd.method.adapters import DenseTeacher

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts share benchmarks/common.py


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fashion_mnist_teacher(path: Path) -> None:
    """A random teacher of configs/fashion_mnist/teacher.yaml's architecture, saved to ``path``."""
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model(
        "resnet18", num_classes=10, in_chans=1, channels=[16, 32, 64, 128], output_stride=8
    )
    torch.save(teacher.state_dict(), path)


@pytest.fixture
def one_thread():
    """The scripts' --threads 1 changes the process-wide setting: put it back afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_fashion_mnist_quick_writes_every_variant_and_resumes(tmp_path, one_thread):
    script = load_script("fashion_mnist")
    arguments = ["--quick", "--output-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    assert script.main([*arguments, *one_thread]) == 0

    results = json.loads((tmp_path / "fashion_mnist_quick.json").read_text())
    expected = {"teacher"} | {f"{label.replace('/', '-')}-seed0" for label in script.VARIANTS}
    assert set(results["runs"]) == expected
    for key, entry in results["runs"].items():
        rules = ("cls",) if key == "teacher" else script.RULES
        assert set(entry["final"]) == set(rules)
        assert all(0.0 <= entry["final"][rule]["top1"] <= 100.0 for rule in rules)
        assert [point["epoch"] for point in entry["curve"]] == [1]
    report = (tmp_path / "fashion_mnist_quick.md").read_text()
    for label in script.VARIANTS:
        assert f"| {label} | 1 |" in report
    assert (tmp_path / "fashion_mnist_quick.png").read_bytes()[:4] == b"\x89PNG"

    # A second start finds every run finished and trains nothing: the results stay as they were.
    (tmp_path / "fashion_mnist_quick.md").write_text(
        report.replace("# Fashion", "# Kept\n# Fashion")
    )
    assert script.main([*arguments, *one_thread]) == 0
    assert json.loads((tmp_path / "fashion_mnist_quick.json").read_text()) == results
    assert (tmp_path / "fashion_mnist_quick.md").read_text().startswith("# Kept\n")


def test_throughput_quick_times_every_method(tmp_path, one_thread):
    script = load_script("throughput")
    assert script.main(["--quick", "--results-dir", str(tmp_path), *one_thread]) == 0

    record = json.loads((tmp_path / "throughput.json").read_text())
    (result,) = record["results"]
    assert result["pair"] == "fashion_mnist"
    for method in ("none", "deit", "cskd", "teacher"):
        times = result["seconds_per_step"][method]
        assert len(times) == record["repeats"] and all(t > 0 for t in times)
    report = (tmp_path / "throughput.md").read_text()
    assert "| fashion_mnist | 8 |" in report and record["command"] in report


def test_throughput_profile_shows_the_patch_head_only_in_the_cskd_step(tmp_path, one_thread):
    script = load_script("throughput")
    arguments = ["--quick", "--profile", "1", "--results-dir", str(tmp_path), *one_thread]
    assert script.main(arguments) == 0

    (result,) = json.loads((tmp_path / "throughput_profile.json").read_text())
    linear = result["linear_calls_per_step"]
    # the class and distillation heads in both steps; the patch head only in CSKD's
    assert linear["cskd"] == linear["deit"] + 1, linear
    assert result["ms_per_step"]["deit"] > 0 and result["ms_per_step"]["cskd"] > 0


def test_teacher_precision_compares_every_precision_with_fp32(tmp_path, one_thread):

    script = load_script("teacher_precision")
    fashion_mnist_teacher(tmp_path / "teacher.pth")
    output = tmp_path / "precision"
    arguments = ["--checkpoint", str(tmp_path / "teacher.pth"), "--max-batches", "1"]
    assert script.main([*arguments, "--batch-size", "40", "--output", str(output)]) == 0
    results = json.loads(output.with_suffix(".json").read_text())
    for split in ("test (eval transform)", "train (augmented)"):
        rows = results[split]
        assert set(rows) == set(script.PRECISIONS)
        assert all(rows["fp32"][f"{key} flips %"] == 0.0 for key in script.TARGETS)
        assert rows["bf16"]["dense targets"] == 40 * 4 * 4  # a 4 x 4 map per image
    assert (
        "python benchmarks/teacher_precision.py --checkpoint"
        in output.with_suffix(".md").read_text()
    )


@pytest.mark.parametrize("regime", ["long", "translated"])
def test_regimes_quick_trains_every_method_and_reports_paired_differences(
    tmp_path, one_thread, regime
):
    script = load_script("regimes")
    arguments = ["--regime", regime, "--quick", "--output-dir", str(tmp_path / "runs")]
    arguments += ["--results-dir", str(tmp_path)]
    assert script.main([*arguments, *one_thread]) == 0
    name = f"regime_{regime}_quick"
    results = json.loads((tmp_path / f"{name}.json").read_text())
    expected = {"teacher"} | {script.run_key(label, 0) for label in script.METHODS}
    assert set(results["runs"]) == expected
    for entry in results["runs"].values():
        assert set(entry["test"]) <= set(script.RULES) and "cls" in entry["test"]
        assert set(entry["val"]) <= set(script.RULES) and entry["curve"][-1]["test"]
    config = json.loads((tmp_path / f"{name}.json").read_text())["runs"]["cskd-linear-seed0"]
    size = 64 if regime == "translated" else 32
    assert (f"data.image_size={size}" in config["overrides"]) == (regime == "translated")
    page = (tmp_path / f"{name}.md").read_text()
    assert "## Prediction (written before the runs)" in page
    assert "| CSKD (cls+dist+patch) - DeiT (cls+dist) | 1 |" in page
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    # a second start skips every finished run and rewrites the same report
    assert script.main([*arguments, *one_thread]) == 0
    assert json.loads((tmp_path / f"{name}.json").read_text()) == results
    # on a new machine the run folders are gone: the teacher is trained again, identically
    teacher = tmp_path / "runs" / f"{regime}_quick" / "teacher"
    for item in sorted(teacher.rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    assert script.main([*arguments, *one_thread]) == 0
    again = json.loads((tmp_path / f"{name}.json").read_text())["runs"]["teacher"]
    assert (teacher / "student.safetensors").is_file()
    assert again["weights_sha256"] == results["runs"]["teacher"]["weights_sha256"]
    assert "previous_weights_sha256" not in again


def test_regimes_trains_only_the_methods_asked_and_records_each_students_teacher(
    tmp_path, one_thread
):
    script = load_script("regimes")
    arguments = ["--regime", "long", "--quick", "--output-dir", str(tmp_path / "runs")]
    arguments += ["--results-dir", str(tmp_path), *one_thread]
    with pytest.raises(SystemExit) as refused:  # a method the regime does not have
        script.main([*arguments, "--methods", "deit,cskd/lienar"])
    assert refused.value.code == 2
    assert script.main([*arguments, "--methods", "deit"]) == 0
    path = tmp_path / "regime_long_quick.json"
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"teacher", "deit-seed0"}
    digest = runs["teacher"]["weights_sha256"]
    assert runs["deit-seed0"]["teacher_weights_sha256"] == digest
    # as if the teacher had been trained on another CPU: other weights recorded, then its folder
    # is gone on this machine and it is trained again before the next student
    runs["teacher"]["weights_sha256"] = "0" * 64
    del runs["deit-seed0"]["teacher_weights_sha256"]  # a run recorded before this field existed
    path.write_text(json.dumps({"runs": runs}))
    teacher = tmp_path / "runs" / "long_quick" / "teacher"
    for item in sorted(teacher.rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    assert script.main([*arguments, "--methods", "cskd/linear"]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert runs["teacher"]["weights_sha256"] == digest  # CPU training is deterministic here
    assert runs["teacher@000000000000"]["test"] == runs["teacher"]["test"]  # the old record kept
    assert runs["deit-seed0"]["teacher_weights_sha256"] == "0" * 64  # what it distilled from
    assert runs["cskd-linear-seed0"]["teacher_weights_sha256"] == digest
    page = (tmp_path / "regime_long_quick.md").read_text()
    deit_line = next(line for line in page.splitlines() if line.startswith("- `deit-seed0`"))
    assert "teacher 000000000000, not the one above" in deit_line
    cskd_line = next(line for line in page.splitlines() if line.startswith("- `cskd-linear-seed0`"))
    assert "not the one above" not in cskd_line


def test_recipe_regime_shares_the_long_teacher_and_chooses_epochs_on_validation(
    tmp_path, one_thread
):
    script = load_script("regimes")
    arguments = ["--regime", "recipe", "--quick", "--output-dir", str(tmp_path / "runs")]
    arguments += ["--results-dir", str(tmp_path)]
    assert script.main([*arguments, *one_thread]) == 0
    runs = json.loads((tmp_path / "regime_recipe_quick.json").read_text())["runs"]
    # the teacher is the long regime's run, trained once in its home and recorded in both
    assert (tmp_path / "runs" / "long_quick" / "teacher" / "student.safetensors").is_file()
    assert not (tmp_path / "runs" / "recipe_quick" / "teacher").exists()
    long_teacher = json.loads((tmp_path / "regime_long_quick.json").read_text())["runs"]["teacher"]
    assert runs["teacher"]["weights_sha256"] == long_teacher["weights_sha256"]
    # every student trains under DeiT's augmentation
    for key in ("pilot-e1-deit-seed0", "pilot-e2-deit-seed0", "cskd-linear-seed0", "none-seed0"):
        assert set(script.DEIT_AUGMENTATION) <= set(runs[key]["overrides"]), key
    # the pilot with the higher validation top-1 (ties: the shorter) becomes deit seed 0
    chosen = script.chosen_epochs({"runs": runs}, (1, 2))
    scores = {e: runs[f"pilot-e{e}-deit-seed0"]["val"]["cls+dist"]["top1"] for e in (1, 2)}
    assert chosen == (2 if scores[2] > scores[1] else 1)
    assert (
        runs["deit-seed0"]["weights_sha256"]
        == runs[f"pilot-e{chosen}-deit-seed0"]["weights_sha256"]
    )
    assert f"optim.epochs={chosen}" in runs["cskd-linear-seed0"]["overrides"]
    page = (tmp_path / "regime_recipe_quick.md").read_text()
    assert f"-> **{chosen} epochs**" in page
    # on a machine without the shared teacher's weights it is trained again and recorded in the
    # sharing regime's results; the home regime's record is left as its students saw it
    home_before = (tmp_path / "regime_long_quick.json").read_text()
    (tmp_path / "runs" / "long_quick" / "teacher" / "student.safetensors").unlink()
    assert script.main([*arguments, *one_thread]) == 0
    assert (tmp_path / "regime_long_quick.json").read_text() == home_before
    teacher = json.loads((tmp_path / "regime_recipe_quick.json").read_text())["runs"]["teacher"]
    assert teacher["shared_from"] == "long" and teacher["matches_home_record"] is True
    assert teacher["home_weights_sha256"] == long_teacher["weights_sha256"]
    assert "the same weights as recorded there" in (tmp_path / "regime_recipe_quick.md").read_text()
    fake = {
        "runs": {
            f"pilot-e{e}-deit-seed0": {"val": {"cls+dist": {"top1": v}}}
            for e, v in ((30, 80.0), (60, 81.0))
        }
    }
    assert script.chosen_epochs(fake, (30, 60)) == 60
    assert script.chosen_epochs({"runs": {}}, (30, 60)) is None


def test_local_teacher_regime_checks_the_teacher_map_before_training_only_its_methods(
    tmp_path, one_thread, capsys, monkeypatch
):
    script = load_script("regimes")
    arguments = ["--regime", "local-teacher", "--quick", "--output-dir", str(tmp_path / "runs")]
    arguments += ["--results-dir", str(tmp_path), *one_thread]
    name = "regime_local_teacher_quick"
    # a teacher that fails the check (a quick teacher always would; the limit makes it certain):
    # one line, exit status 1, the teacher's figures on the page, and no student trained
    monkeypatch.setitem(script.LOCALITY_LIMITS, "object_names_label", (">=", 100.5))
    assert script.main([*arguments, "--enforce-locality"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot test CSKD's mechanism: object cells name the garment's class at" in last
    assert "needed >= 100.5%. No student is trained" in last
    runs = json.loads((tmp_path / f"{name}.json").read_text())["runs"]
    assert set(runs) == {"teacher"}
    assert sorted(path.name for path in (tmp_path / "runs" / "local-teacher_quick").iterdir()) == [
        "claims",
        "teacher",
    ]
    locality = runs["teacher"]["locality"]
    assert (locality["receptive_field_px"], locality["cell_px"], locality["images"]) == (19, 8, 32)
    assert locality["weights_sha256"] == runs["teacher"]["weights_sha256"]
    assert "student.name=bagnet19" in runs["teacher"]["overrides"]
    page = (tmp_path / f"{name}.md").read_text()
    assert "- Teacher's map before any student" in page
    assert f"name the garment's class at **{locality['object_names_label']:.1f}%**" in page
    assert "**refused**: object cells" in page
    # quick mode reports the check without enforcing it: the teacher is kept and not measured
    # again, and only the regime's two methods train
    assert script.main(arguments) == 0
    runs = json.loads((tmp_path / f"{name}.json").read_text())["runs"]
    assert set(runs) == {"teacher", "deit-seed0", "cskd-linear-seed0"}
    assert runs["teacher"]["locality"] == locality
    assert "teacher.name=bagnet19" in runs["cskd-linear-seed0"]["overrides"]
    page = (tmp_path / f"{name}.md").read_text()
    assert "| deit | 1 |" in page and "| cskd/linear | 1 |" in page and "| none |" not in page
    assert "| CSKD (cls+dist+patch) - DeiT (cls+dist) | 1 |" in page and "CKF:" not in page
    assert "(quick mode: enforced only with --enforce-locality)" in page


def test_the_second_local_teacher_changes_only_the_teacher():
    """``local-teacher-27`` is ``local-teacher`` with ``bagnet27`` in both the teacher's run and
    the students' ``teacher.name``: the same data, students, methods, check and limits."""
    script = load_script("regimes")
    first, second = script.REGIMES["local-teacher"], script.REGIMES["local-teacher-27"]
    for quick in (False, True):
        for overrides in ("teacher_overrides", "student_overrides"):
            before = getattr(first, overrides)(quick=quick)
            after = getattr(second, overrides)(quick=quick)
            assert [o.replace("bagnet19", "bagnet27") for o in before] == after
            assert any("bagnet27" in override for override in after)
    assert second.methods == first.methods and second.locality_check
    assert second.stem == "regime_local_teacher_27"


def test_a_local_teacher_page_subtracts_the_translated_runs_seed_by_seed():
    """The local-teacher pages compare each student with the same method and seed under the
    translated regime's ResNet-18: only the teacher differs."""
    script = load_script("regimes")
    regime = script.REGIMES["local-teacher-27"]
    assert regime.compare_with == "translated"

    def run(**top1):
        return {"test": {rule: {"top1": value} for rule, value in top1.items()}}

    here = {
        "runs": {
            "deit-seed0": run(**{"cls+dist": 45.0}),
            "cskd-linear-seed0": run(**{"cls+dist+patch": 46.0}),
            "cskd-linear-seed1": run(**{"cls+dist+patch": 47.0}),
        }
    }
    there = {
        "runs": {
            "teacher": run(cls=82.39),
            "deit-seed0": run(**{"cls+dist": 44.0}),
            "cskd-linear-seed0": run(**{"cls+dist+patch": 43.0}),
            "cskd-linear-seed1": run(**{"cls+dist+patch": 43.5}),
        }
    }
    lines = script.comparison_lines(here, there, regime)
    assert "its teacher's test top-1 82.39%" in lines[1]
    deit, cskd, gap = lines[-3:]
    assert deit.startswith("| deit (cls+dist): `local-teacher-27` - `translated` | 1 | +1.00 |")
    assert "| 2 | +3.00, +3.50 | +3.25 ± 0.35 |" in cskd
    # CSKD - DeiT of seed 0: +1.00 here (46 - 45), -1.00 there (43 - 44): +2.00 more
    assert gap.startswith("| CSKD - DeiT: `local-teacher-27` - `translated` | 1 | +2.00 |")


def test_locality_check_passes_a_local_map_and_refuses_the_translated_resnet():
    script = load_script("regimes")
    local = {"object_names_label": 65.0, "background_names_label": 25.0}
    assert script.locality_problem(local) == ""
    # the translated regime's ResNet-18 (docs/results/regime_translated.md): 71.7% and 74.2%
    resnet = {"object_names_label": 71.7, "background_names_label": 74.2}
    assert script.locality_problem(resnet) == (
        "background cells name the garment's class at 74.2%, needed <= 40%"
    )
    wrong = {"object_names_label": 49.9, "background_names_label": 10.0}
    assert script.locality_problem(wrong).startswith("object cells name the garment's class")
    assert script.locality_problem({**local, "object_names_label": float("nan")})  # none seen
    record = {
        **resnet,
        "images": 256,
        "cell_px": 8,
        "receptive_field_px": 64,
        "object_cells": 11.4,
        "background_cells": 88.6,
        "background_label_probability": 60.0,
        "blind_cells": 0.0,
        "blind_names_label": float("nan"),
        "blind_label_probability": float("nan"),
    }
    lines = script.locality_lines(record, quick=False)
    assert "no background cell has a window without garment pixels" in lines[0]
    assert lines[1].endswith("**refused**: " + script.locality_problem(resnet))
    # the regime's students follow its own methods, seed 0 of each first
    regime = script.REGIMES["local-teacher"]
    assert script.plan(2, regime.methods) == [
        ("deit", 0),
        ("cskd/linear", 0),
        ("deit", 1),
        ("cskd/linear", 1),
    ]
    with pytest.raises(ValueError, match="unknown methods"):
        script.Regime(
            name="x", title="", data=(), teacher=(), student=(), prediction="", methods=("dino",)
        )


def _fake_runs(differences: list[float], *, deit: float = 80.0) -> dict:
    """A regime's results: per seed, DeiT at ``deit`` and CSKD ``difference`` points above it."""
    runs = {"teacher": {"test": {"cls": {"top1": 89.0}}}}
    for seed, difference in enumerate(differences):
        runs[f"deit-seed{seed}"] = {"test": {"cls+dist": {"top1": deit + seed}}}
        runs[f"cskd-linear-seed{seed}"] = {
            "test": {"cls+dist+patch": {"top1": deit + seed + difference}}
        }
    return {"runs": runs}


def test_data_ladder_page_and_plot_from_whatever_rungs_have_runs(tmp_path, one_thread):
    script = load_script("regimes")
    # no rung has runs yet: a page of empty rows and no plot
    assert script.main(["--regime", "data", "--results-dir", str(tmp_path)]) == 0
    page = (tmp_path / "regime_data.md").read_text()
    assert "## Prediction (written before the runs)" in page
    assert "| 2,500 (`data-2500`) | 0 | — | — | — |" in page
    assert not (tmp_path / "regime_data.png").exists()
    # the long regime's three seeds are the 10,000 rung, two seeds at 2,500, none at 25,000
    (tmp_path / "regime_long.json").write_text(json.dumps(_fake_runs([-1.0, -0.5, 0.0])))
    (tmp_path / "regime_data-2500.json").write_text(json.dumps(_fake_runs([1.0, 2.0])))
    assert script.main(["--regime", "data", "--results-dir", str(tmp_path)]) == 0
    page = (tmp_path / "regime_data.md").read_text()
    assert page.count("## Prediction (written before the runs)") == 1  # the block was replaced
    # mean -0.5, std 0.5, 2 SE = 2 x 0.5 / sqrt(3) = 0.58
    assert "| 10,000 (`long`) | 3 | -1.00, -0.50, +0.00 | -0.50 ± 0.50 | within its noise " in page
    assert "(2 SE = 0.58) |" in page
    assert "| 2,500 (`data-2500`) | 2 | +1.00, +2.00 | +1.50 ± 0.71 |" in page
    assert "| 25,000 (`data-25000`) | 0 | — | — | — |" in page
    assert "| 2,500 | 89.00 | 80.50 ± 0.71 (2) | 82.00 ± 1.41 (2) |" in page
    assert "| 25,000 | — | — | — |" in page
    assert "![CSKD - DeiT against training images](regime_data.png)" in page
    assert (tmp_path / "regime_data.png").stat().st_size > 1000
    points = script.ladder_points(tmp_path)
    assert [point["images"] for point in points] == [2500, 10000, 25000]
    assert script.two_standard_errors(points[1]["differences"]) == pytest.approx(1 / 3**0.5)
    # a rung's own command trains its teacher and the two methods, then rewrites the ladder
    quick = tmp_path / "quick"
    arguments = ["--regime", "data-2500", "--quick", "--output-dir", str(quick / "runs")]
    assert script.main([*arguments, "--results-dir", str(quick), *one_thread]) == 0
    runs = json.loads((quick / "regime_data-2500_quick.json").read_text())["runs"]
    assert set(runs) == {"teacher", "deit-seed0", "cskd-linear-seed0"}
    page = (quick / "regime_data_quick.md").read_text()
    assert "| 2,500 (`data-2500`) | 1 |" in page and "(quick mode: a smoke test" in page
    assert "| 10,000 (`long`) | 0 |" in page and (quick / "regime_data_quick.png").is_file()
    # the page's command can be pasted into a shell as it stands
    command = page.split("- Command: `", 1)[1].split("`", 1)[0]
    assert shlex.split(command)[:4] == ["python", "benchmarks/regimes.py", "--regime", "data-2500"]
    assert "(" not in command


def test_data_ladder_rungs_train_on_their_size_with_the_same_validation_split():
    from cskd.config import load_config
    from cskd.data.build import split_indices

    script = load_script("regimes")
    splits = {}
    for name, images in script.DATA_LADDER.items():
        regime = script.REGIMES[name]
        for recipe, overrides in (
            ("teacher.yaml", regime.teacher_overrides(quick=False)),
            ("cskd.yaml", regime.student_overrides(quick=False)),
        ):
            config = load_config(script.RECIPES / recipe, overrides)
            assert config.data.train_subset == images, (name, recipe)
            assert (config.data.val_split, config.data.subset_seed) == (5000, 0)
            assert (config.optim.epochs, config.data.image_size) == (30, 32)
        splits[name] = split_indices(size=60000, train_subset=images, val_split=5000, seed=0)
        if name != "long":
            assert regime.methods == ("deit", "cskd/linear") and not regime.teacher_regime
    validation = {name: split[1] for name, split in splits.items()}
    assert validation["data-2500"] == validation["long"] == validation["data-25000"]
    # and the smaller training sets are the first images of the larger ones
    assert set(splits["data-2500"][0]) < set(splits["long"][0]) < set(splits["data-25000"][0])


def test_epoch_time_runs_old_and_new_seeding_side_by_side(tmp_path, one_thread):

    script = load_script("epoch_time")
    fashion_mnist_teacher(tmp_path / "teacher.pth")
    output = tmp_path / "epoch_time"
    arguments = ["--teacher", str(tmp_path / "teacher.pth"), "--repeats", "1", "--steps", "2"]
    assert script.main([*arguments, "--eval-batches", "1", "--output", str(output)]) == 0
    page = output.with_suffix(".md").read_text()
    assert "| before seeding |" in page and "| after seeding |" in page
    # the legacy path is restored afterwards: the sampler seeds the CPU generator only again
    from cskd.data import sampling

    assert "default_generator" in sampling.SeededSamples.__getitem__.__code__.co_names


def test_gpu_study_script_quick_mode_runs_every_run_of_the_full_regime_on_the_cpu(tmp_path):
    import os
    import subprocess

    from cskd.data import FASHION_MNIST_ROOT

    script = BENCHMARKS / "gpu_study.sh"
    environment = dict(
        os.environ,
        QUICK="1",
        WORKERS="2",
        PYTHON=sys.executable,
        OUTPUT_DIR=str(tmp_path / "runs"),
        LOG_DIR=str(tmp_path),
    )
    result = subprocess.run(
        ["bash", str(script), FASHION_MNIST_ROOT, str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr + "".join(
        path.read_text()[-2000:] for path in tmp_path.glob("gpu_study_*worker*.log")
    )
    results = json.loads((tmp_path / "regime_full_quick.json").read_text())
    assert len(results["runs"]) == 1 + 4  # the teacher, then every method once in quick mode
    assert "data.root=" + FASHION_MNIST_ROOT in results["runs"]["deit-seed0"]["overrides"]
    # then DeiT's augmentation on the same data, with the full regime's teacher
    recipe = json.loads((tmp_path / "regime_full-recipe_quick.json").read_text())["runs"]
    assert recipe["teacher"]["shared_from"] == "full"
    assert recipe["teacher"]["weights_sha256"] == results["runs"]["teacher"]["weights_sha256"]
    assert "augment.cutmix=1.0" in recipe["cskd-linear-seed0"]["overrides"]
    assert "data.train_subset=0" in recipe["cskd-linear-seed0"]["overrides"]
    missing = subprocess.run(
        ["bash", str(script), str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "Fashion-MNIST IDX files" in missing.stderr


def test_transfer_quick_pretrains_fine_tunes_every_start_and_resamples_at_48_px(
    tmp_path, one_thread
):
    script = load_script("transfer")
    arguments = ["--quick", "--output-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    assert script.main([*arguments, *one_thread]) == 0
    results = json.loads((tmp_path / "transfer_quick.json").read_text())["runs"]
    expected = {"teacher", "pre-none", "pre-deit", "pre-cskd"}
    expected |= {f"ft32-{start}-seed0" for start in ("scratch", "none", "deit", "cskd")}
    expected |= {"ft48-scratch-seed0", "ft48-cskd-seed0"}
    assert set(results) == expected
    folders = tmp_path / "runs" / "data"
    assert sorted(p.name for p in (folders / "transfer" / "val").iterdir()) == [
        "Ankle_boot",
        "Bag",
        "Sandal",
        "Shirt",
        "Sneaker",
    ]
    log = results["ft48-cskd-seed0"]["log"]
    assert any("resampled pos_embed from a 8x8 to a 12x12" in line for line in log)
    assert any("re-initialised head, head_dist (reset_head" in line for line in log)
    assert results["ft32-scratch-seed0"]["log"] == []  # scratch starts from nothing
    page = (tmp_path / "transfer_quick.md").read_text()
    assert "| 48 px | cskd |" in page and "Quick mode" in page


def test_speed_path_quick_times_every_way_and_the_cache_build(tmp_path):
    """The GPU script's smoke mode on the CPU: online, cached and the release's way (fp16 with
    a gradient scaler), and the cost of a real `cskd cache` build."""
    import os
    import subprocess

    environment = dict(os.environ, QUICK="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_speed_path.sh"), str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "speed_path_quick.json").read_text())
    times = record["results"][0]["seconds_per_step"]
    assert set(times) == {"online", "cached", "release"}
    assert all(len(values) == 2 and min(values) > 0 for values in times.values())
    assert [row["storage"].split(",")[0] for row in record["cache_build"]] == [
        "every logit",
        "top-9",
    ]
    assert record["loading"]["per_worker_images_per_s"] > 0
    page = (tmp_path / "speed_path.md").read_text()
    assert "| online / cached |" in page and "generated:speed_path_quick start" in page
    assert "loader workers needed" in page


def test_cache_fidelity_quick_compares_cached_with_online_targets(tmp_path, one_thread):
    script = load_script("cache_fidelity")
    arguments = ["--quick", "--batches", "1", "--output-dir", str(tmp_path / "runs")]
    assert script.main([*arguments, "--results-dir", str(tmp_path), *one_thread]) == 0
    results = json.loads((tmp_path / "cache_quick.json").read_text())["runs"]
    assert set(results["caches"]) == set(script.CACHES)
    assert len(results["fidelity"]) == len(script.CACHES) * len(script.SETTINGS)
    for row in results["fidelity"].values():
        assert 0.0 <= row["hard_ckf_a1"] <= 1.0 and row["locations"] == 16 * 16
    assert "cached-cskd-linear-seed0" in results
    page = (tmp_path / "cache_quick.md").read_text()
    assert "hard CKF a = 1" in page and "cached - online" in page


def test_hierarchical_student_quick_trains_a_swin_with_each_method(tmp_path, one_thread):
    script = load_script("hierarchical_student")
    arguments = ["--quick", "--output-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    assert script.main([*arguments, *one_thread]) == 0
    runs = json.loads((tmp_path / "hierarchical_student_quick.json").read_text())["runs"]
    assert list(runs) == ["teacher", "none", "deit", "cskd/linear"]
    assert set(runs["cskd/linear"]["test_top1"]) == {"cls", "cls+dist", "cls+dist+patch"}
    assert set(runs["deit"]["test_top1"]) == {"cls"}  # a plain classifier under deit
    page = (tmp_path / "hierarchical_student_quick.md").read_text()
    assert "| cskd/linear |" in page and "generated:end" in page
    # started again: every run is already done, and notes written around the block are kept
    (tmp_path / "hierarchical_student_quick.md").write_text(page + "\nNotes kept.\n")
    assert script.main([*arguments, *one_thread]) == 0
    assert (tmp_path / "hierarchical_student_quick.md").read_text().endswith("Notes kept.\n")


def test_families_table_records_each_outcome_in_one_line(tmp_path, one_thread):
    script = load_script("families")
    families = ["resnet", "pit"]
    assert script.main(["--families", *families, "--results-dir", str(tmp_path), *one_thread]) == 0
    rows = {r["family"]: r for r in json.loads((tmp_path / "families.json").read_text())["rows"]}
    assert all(rows["resnet"][column] == "yes" for column in script.COLUMNS)
    assert rows["pit"]["student cskd"].startswith("no: its final features are")
    assert rows["pit"]["student deit"] == "yes" and rows["pit"]["teacher deit"] == "yes"
    page = (tmp_path / "families.md").read_text()
    assert "tracebacks (bugs): 0" in page and "| pit | `pit_ti_224` |" in page
    # a refusal is recorded whole, with its fix, as the user gets it: the table cell shortens it
    # and the page lists it in full below the table
    model, size = script.build("pit_ti_224")
    with pytest.raises(USER_ERRORS) as refusal:
        DenseTeacher(model, check_size=size, in_chans=3)
    whole = "no: " + " ".join(str(refusal.value).split())
    assert len(whole) > 200 and rows["pit"]["teacher cskd"] == whole
    assert whole.replace("|", "/") in page
    # --update replaces the named families' rows and keeps the others
    arguments = ["--families", "pit", "--update", "--results-dir", str(tmp_path), *one_thread]
    assert script.main(arguments) == 0
    record = json.loads((tmp_path / "families.json").read_text())
    assert [r["family"] for r in record["rows"]] == families and len(record["updates"]) == 1


def test_run_diagnostics_averages_the_recorded_diagnostics_over_seeds(tmp_path, capsys):
    script = load_script("run_diagnostics")
    teacher = {
        "local_top1": 17.5,
        "object_local_top1": 50.3,
        "background_local_top1": 13.3,
        "global_top1": 84.4,
        "local_agrees_with_global": 18.8,
    }
    for seed, local in ((0, 50.0), (1, 60.0)):
        run = tmp_path / f"cskd-linear-seed{seed}"
        run.mkdir()
        (run / "final_metrics.json").write_text("{}")
        diagnostics = {
            "local_weight": 0.9,
            "attention_distance": [30.0, 32.0],
            "teacher": teacher,
            "student": {"follows_local": local, "follows_global": 10.0, "follows_ckf_target": 40.0},
        }
        records = [{"type": "step"}, {"type": "epoch", "epoch": 2, "diagnostics": diagnostics}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "deit-seed0").mkdir()  # unfinished: no final_metrics.json, left out
    assert script.main([str(tmp_path), "--output", str(tmp_path / "d.md")]) == 0
    text = (tmp_path / "d.md").read_text()
    assert "| cskd-linear | 2 | 3 | 0.90 | 55.0 | 10.0 | 40.0 | 31.0 |" in text
    assert "| deit |" not in text and "agree with its global answer at 18.8%" in text
    assert script.main([str(tmp_path / "missing")]) == 2


def test_finite_check_quick_measures_both_checks_beside_the_step(tmp_path, one_thread):
    script = load_script("finite_check")
    assert script.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "finite_check_quick.json").read_text())
    assert [row["student"] for row in results["rows"]] == list(script.STUDENTS)
    for row in results["rows"]:
        assert row["step_s"] > 0 and row["weights_check_s"] > 0 and row["teacher_check_s"] > 0
    assert (
        "python benchmarks/finite_check.py --quick"
        in (tmp_path / "finite_check_quick.md").read_text()
    )


def test_local_recipe_quick_shares_the_local_teacher_trains_under_deit_augmentation_and_compares(
    tmp_path, one_thread
):
    script = load_script("regimes")
    arguments = ["--regime", "local-recipe", "--quick", "--output-dir", str(tmp_path / "runs")]
    arguments += ["--results-dir", str(tmp_path), *one_thread]
    assert script.main(arguments) == 0
    runs = json.loads((tmp_path / "regime_local_recipe_quick.json").read_text())["runs"]
    # the teacher is local-teacher-27's bagnet27, trained once in that regime's folder
    assert (
        tmp_path / "runs" / "local-teacher-27_quick" / "teacher" / "student.safetensors"
    ).is_file()
    assert "student.name=bagnet27" in runs["teacher"]["overrides"]
    assert "locality" in runs["teacher"]  # the check is measured on this regime's teacher too
    assert set(runs) >= {
        "pilot-e1-deit-seed0",
        "pilot-e2-deit-seed0",
        "deit-seed0",
        "cskd-linear-seed0",
    }
    for key in ("deit-seed0", "cskd-linear-seed0"):
        overrides = runs[key]["overrides"]
        assert set(script.DEIT_AUGMENTATION) <= set(overrides), key
        assert "teacher.name=bagnet27" in overrides and "data.image_size=64" in overrides
    page = (tmp_path / "regime_local_recipe_quick.md").read_text()
    assert "## Prediction (written before the runs)" in page
    # against local-teacher-27 (no runs there yet in this folder): rows with n = 0
    assert (
        "Against the `local-teacher-27` regime (the same students and seeds, without DeiT" in page
    )
    assert "| CSKD - DeiT: `local-recipe` - `local-teacher-27` | 0 |" in page


def test_recipe_e30_trains_the_seeds_asked_at_30_epochs(tmp_path, one_thread):
    script = load_script("regimes")
    assert script.parse_seeds("3,4") == [3, 4] and script.parse_seeds("2") == 2
    assert script.plan([3, 4], ("deit", "cskd/linear")) == [
        ("deit", 3),
        ("cskd/linear", 3),
        ("deit", 4),
        ("cskd/linear", 4),
    ]
    regime = script.REGIMES["recipe-e30"]
    assert "optim.epochs=30" in regime.student and set(script.DEIT_AUGMENTATION) <= set(
        regime.student
    )
    assert regime.teacher_regime == "long" and regime.compare_with == "recipe"


def test_a_comparison_pairs_seeds_and_the_cskd_deit_gap_only_under_the_same_teacher():
    script = load_script("regimes")
    here = _fake_runs([1.0, 2.0, 3.0])  # CSKD - DeiT: +1, +2, +3
    there = _fake_runs([0.5, 0.5, 0.5], deit=79.0)  # +0.5 each; DeiT 1 point lower
    for runs, digest in ((here, "a"), (there, "a")):
        for key, entry in runs["runs"].items():
            if key != "teacher":
                entry["teacher_weights_sha256"] = digest
    there["runs"]["deit-seed2"]["teacher_weights_sha256"] = "b"  # another teacher: seed 2 out
    regime = script.REGIMES["recipe-e30"]
    lines = script.comparison_lines(here, there, regime)
    deit = next(line for line in lines if line.startswith("| deit (cls+dist)"))
    assert "| 2 | +1.00, +1.00 |" in deit  # seeds 0 and 1 only
    cskd = next(line for line in lines if line.startswith("| cskd/linear (cls+dist+patch)"))
    assert "| 3 | +1.50, +2.50, +3.50 |" in cskd  # the CSKD runs of seed 2 share a teacher
    gap = next(line for line in lines if line.startswith("| CSKD - DeiT:"))
    assert "| 2 | +0.50, +1.50 | +1.00 ± 0.71 |" in gap  # (1 - 0.5), (2 - 0.5)
