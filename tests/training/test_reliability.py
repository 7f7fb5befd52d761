"""Nothing lost: kills, SIGTERM, non-finite losses, full disks, damaged and untrusted files.

The interruption tests run real ``cskd train`` processes on synthetic 32 px images (Mixup/CutMix,
random erasing, RandAugment, drop path, EMA and per-step CKF progress all on) and kill them with
SIGKILL at chosen moments, through :data:`WRAPPER`: a script that patches, in its own process
only, cskd's atomic write (to die before or half-way through writing a chosen file) and the
training step (to hold before a chosen step until the test releases it, so that the test acts at
a known moment however slow the machine). Each run resumes with
``train.resume=auto`` and must end bit for bit like the uninterrupted run: weights, EMA weights,
checkpoints (optimizer, scheduler, RNG states) and every metrics record except wall-clock
timings (``images_per_s``, ``epoch_time_s``), which cannot repeat. The rest of the faults run in
this process through ``cskd.cli.main``. docs/results/reliability.md lists what each one printed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG, tiny_overrides
from safetensors.torch import load_file

import cskd.training.state
from cskd.cli import main
from cskd.errors import CheckpointError
from cskd.infra.checkpoint import read_file
from cskd.training.state import read_checkpoint

WRAPPER = r'''
"""``cskd train`` that SIGKILLs itself at a planned moment (for tests/training/test_reliability.py).

KILL_AT=<file name>:<n>:<phase>: at the n-th atomic write of that file, die before writing
anything (phase "before") or after writing half its bytes to the temporary file and syncing them
(phase "mid"), which is what a kill or a power cut during the write leaves on disk.
HOLD_AT=<n>:<path>: before global step n (counted over the run, a resumed one included), wait
for as long as the file at <path> exists (the test deletes it to let the run go on). The run is then held at a known
step for as long as the test needs, however slow the machine: no sleep decides an outcome.
"""
import io
import os
import signal
import sys
import tempfile
import time

from cskd import cli
from cskd.infra import checkpoint
from cskd.training import engine

name, number, phase = (os.environ.get("KILL_AT") or "-:0:-").split(":")
writes = 0
atomic_write = checkpoint.atomic_write


def planned_atomic_write(path, write):
    global writes
    if path.name == name:
        writes += 1
        if writes == int(number):
            if phase == "mid":
                buffer = io.BytesIO()
                write(buffer)
                data = buffer.getvalue()
                handle, _ = tempfile.mkstemp(
                    prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
                )
                os.write(handle, data[: len(data) // 2])
                os.fsync(handle)
            os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, write)


checkpoint.atomic_write = planned_atomic_write
hold_at, _, hold_path = (os.environ.get("HOLD_AT") or "0:").partition(":")
step = engine.Trainer.step


def held_step(self, batch, state):
    holding = state.global_step + 1 == int(hold_at)
    if holding and os.path.exists(hold_path):
        open(hold_path + ".reached", "w").close()  # tells the test that it is held now
    while holding and os.path.exists(hold_path):
        time.sleep(0.01)  # signals land here too, as they would in a long step
    return step(self, batch, state)


if int(hold_at):
    engine.Trainer.step = held_step
sys.exit(cli.main(sys.argv[1:]))
'''

STEPS = 12  # 3 epochs x 4 steps of 8 images
RUN = {
    "optim.epochs": 3,
    "optim.lr": 0.05,  # large enough that every step visibly moves the weights
    "train.device": "cpu",
    "train.checkpoint_interval": 1,
    "train.log_interval": 1,
    "train.ema": True,
    "train.ema_decay": 0.9,
    "augment.mixup": 0.8,
    "augment.cutmix": 1.0,
    "augment.reprob": 0.25,
    "augment.randaugment": "rand-m9-mstd0.5-inc1",
    "student.drop_path": 0.1,
    "distill.progress": "step",  # CKF's local weight changes at every step
}
TIMINGS = ("images_per_s", "epoch_time_s")


# ---------------------------------------------------------------------------------- helpers


def start(run_dir: Path, teacher: str, *, kill: str = "", hold_at: int = 0, **extra):
    """A ``cskd train`` subprocess of the reliability run (through WRAPPER) writing to run_dir.
    ``hold_at=n``: it stops before its n-th step until :func:`release` (``hold_path``)."""
    wrapper = run_dir.parent / "kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    hold = hold_path(run_dir)
    Path(f"{hold}.reached").unlink(missing_ok=True)  # a directory reused by a later start
    if hold_at:
        hold.touch()
    env = dict(os.environ, KILL_AT=kill, HOLD_AT=f"{hold_at}:{hold}", OMP_NUM_THREADS="1")
    overrides = tiny_overrides(run_dir, teacher, **{**RUN, **extra})
    return subprocess.Popen(
        [sys.executable, str(wrapper), "train", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under a scheduler
    )


def hold_path(run_dir: Path) -> Path:
    """The file whose existence holds a run started with ``hold_at`` (beside its directory)."""
    return run_dir.parent / f"{run_dir.name}.hold"


def release(run_dir: Path) -> None:
    """Let a held run go on."""
    hold_path(run_dir).unlink(missing_ok=True)


def run(run_dir: Path, teacher: str, **options) -> subprocess.CompletedProcess:
    process = start(run_dir, teacher, **options)
    out, err = process.communicate(timeout=HANG)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock timings."""
    result = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in TIMINGS:
            record.pop(key, None)
            record.get("train", {}).pop(key, None)
        result.append(record)
    return result


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if r["type"] == "step"]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    """Wait until ``step`` is logged (the caller holds the run after it, so it cannot end)."""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(s >= step for s in _complete_steps(path)):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} was never logged")


def _complete_steps(path: Path) -> list[int]:
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["type"] == "step":
            steps.append(record["step"])
    return steps


def assert_equal(got, expected, where: str = "") -> None:
    """Exact equality of nested checkpoint contents (tensors compared bit for bit)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, where
        assert torch.equal(got, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_equal(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_equal(a, b, f"{where}[{index}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """run_dir ended exactly like the uninterrupted reference run."""
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert_equal(load_file(str(run_dir / name)), load_file(str(reference / name)), name)
    assert records(run_dir) == records(reference)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final == json.loads((reference / "final_metrics.json").read_text())
    for name in ("last.pt", "best.pt"):
        got, expected = read_checkpoint(run_dir / name), read_checkpoint(reference / name)
        for key in ("student", "ema", "optimizer", "scheduler", "state", "rng"):
            assert_equal(got[key], expected[key], f"{name}/{key}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_checkpoint) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run(run_dir, teacher_checkpoint)
    assert result.returncode == 0, result.stderr
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    return run_dir


# ---------------------------------------------------------------------------------- interruption


def test_sigkill_at_any_moment_then_resume_ends_exactly_like_the_uninterrupted_run(
    tmp_path, teacher_checkpoint, reference
):
    run_dir = tmp_path / "run"
    resume = {"train.resume": "auto"}

    # 1. killed half-way through writing the checkpoint of step 3: last.pt still holds step 2
    killed = run(run_dir, teacher_checkpoint, kill="last.pt:3:mid")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(run_dir.glob(".last.pt.*.tmp")), "the kill did not interrupt a write"
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] == 2
    assert logged_steps(run_dir) == [1, 2, 3]  # step 3 was logged, its checkpoint never landed

    # 2. killed at the end of epoch 1, after best.pt and before last.pt: last.pt holds step 4,
    #    saved before that epoch's evaluation, so the resumed run evaluates epoch 1 again
    killed = run(run_dir, teacher_checkpoint, kill="last.pt:3:before", **resume)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list(run_dir.glob(".*.tmp")), "the half-written file was not cleaned up"
    last = read_checkpoint(run_dir / "last.pt")["state"]
    assert (last["global_step"], last["epoch"], last["step_in_epoch"]) == (4, 0, 4)
    assert read_checkpoint(run_dir / "best.pt")["state"]["epoch"] == 1

    # 3. killed from outside while training, at whatever moment the signal lands
    #    (between step 7 and the hold before step 11: it cannot have finished)
    process = start(run_dir, teacher_checkpoint, hold_at=11, **resume)
    wait_for_step(run_dir, 7, process)
    process.kill()
    process.communicate(timeout=HANG)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "student.safetensors").exists()

    # 4. killed half-way through writing the final student.safetensors
    killed = run(run_dir, teacher_checkpoint, kill="student.safetensors:1:mid", **resume)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(run_dir.glob(".student.safetensors.*.tmp"))
    assert not (run_dir / "student.safetensors").exists()

    # 5. resumed to the end
    finished = run(run_dir, teacher_checkpoint, **resume)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stderr
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(run_dir, reference)


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def wait_until_held(run_dir: Path, process: subprocess.Popen) -> None:
    """Wait until a run started with ``hold_at`` is held (everything before that step, its
    checkpoint included, is done)."""
    wait_for_file(Path(f"{hold_path(run_dir)}.reached"), process)


def wait_for_log(run_dir: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG
    log = run_dir / "train.log"
    while not (log.exists() and text in log.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.02)


STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP]


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_saves_at_the_next_step_boundary_exits_128_plus_it_and_resume_continues(
    tmp_path, teacher_checkpoint, reference, signum
):
    """SIGTERM (schedulers), Ctrl-C, SIGUSR1 (SLURM's --signal) and SIGHUP (a closed terminal):
    the run saves, then exits 128 + the signal, so that a scheduler never takes an unfinished
    run for a finished one."""
    run_dir = tmp_path / "run"
    # one loader worker: the signal goes to the whole process group, as a scheduler (or a
    # terminal's Ctrl-C) sends it
    process = start(run_dir, teacher_checkpoint, hold_at=3, **{"data.workers": 1})
    wait_until_held(run_dir, process)
    os.killpg(process.pid, signum)
    release(run_dir)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == 128 + signum, err[-3000:]
    assert "stop requested: saved" in err
    line = _one_error_line(err)
    assert f"stopped by {signal.Signals(signum).name}" in line and "train.resume=auto" in line
    stopped_at = read_checkpoint(run_dir / "last.pt")["state"]["global_step"]
    assert 2 <= stopped_at < STEPS
    assert logged_steps(run_dir)[-1] == stopped_at, "a step ran after the save, or was lost"
    assert not (run_dir / "student.safetensors").exists()

    resumed = run(run_dir, teacher_checkpoint, **{"train.resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stderr
    assert_same_run(run_dir, reference)


def test_resume_after_the_training_set_grew_follows_the_new_schedule_and_says_so(
    tmp_path, teacher_checkpoint
):
    """A run stopped by SIGTERM and resumed on a larger training set: the learning rate follows
    the schedule of the new length (as an uninterrupted run on that set has it), and the
    resumed run names every setting that changed, never silently."""
    run_dir = tmp_path / "run"
    process = start(run_dir, teacher_checkpoint, hold_at=3)
    wait_until_held(run_dir, process)
    os.killpg(process.pid, signal.SIGTERM)
    release(run_dir)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == 128 + signal.SIGTERM, err
    stopped = read_checkpoint(run_dir / "last.pt")["state"]
    assert stopped["epoch"] == 0 and stopped["global_step"] < 4  # stopped in the first epoch

    grown = {"data.synthetic_size": 64}  # 8 steps per epoch instead of 4
    resumed = run(run_dir, teacher_checkpoint, **grown, **{"train.resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr
    assert "data.synthetic_size 32 -> 64" in resumed.stderr
    assert "steps per epoch 4 -> 8" in resumed.stderr
    uninterrupted = run(tmp_path / "grown", teacher_checkpoint, **grown)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    def rates(directory: Path, epoch: int) -> list[float]:
        steps = [r for r in records(directory) if r["type"] == "step" and r["epoch"] == epoch]
        return [r["lr"] for r in steps]

    for epoch in (1, 2):  # wholly after the resume: the same positions of the same schedule
        assert rates(run_dir, epoch) == rates(tmp_path / "grown", epoch), epoch
    assert len(rates(run_dir, 2)) == 8


def test_a_second_signal_ends_the_run_at_once(tmp_path, teacher_checkpoint):
    run_dir = tmp_path / "run"
    # never released: a stuck step; with a loader worker, which must not outlive the run
    process = start(run_dir, teacher_checkpoint, hold_at=3, **{"data.workers": 1})
    wait_until_held(run_dir, process)  # so that the first signal finds it inside a step
    workers = _children(process.pid)
    assert workers
    os.kill(process.pid, signal.SIGTERM)
    wait_for_log(run_dir, "SIGTERM: saving last.pt at the next step boundary", process)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=HANG)  # a run that waited for the step hangs here
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = _one_error_line(err)
    assert "stopped at once by a second SIGTERM" in line, line
    assert f"{run_dir / 'last.pt'} holds step 2" in line, line
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] == 2
    assert not (run_dir / ".cskd.lock").exists()
    assert all(_ended(pid) for pid in workers), workers  # not orphaned


def test_a_signal_before_the_first_step_ends_the_run_at_once_and_leaves_nothing(
    tmp_path, teacher_checkpoint
):
    run_dir = tmp_path / "run"
    process = start(run_dir, teacher_checkpoint, hold_at=1)  # held before its first step
    wait_until_held(run_dir, process)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = _one_error_line(err)
    assert "stopped by SIGTERM before the first step" in line, line
    assert not run_dir.exists(), list(run_dir.iterdir())  # it made the directory: it goes


def test_a_signal_while_the_loader_is_stuck_on_a_file_ends_the_run(tmp_path, teacher_checkpoint):
    """A file that never answers (a FIFO; a hung network mount behaves alike) blocks the
    pre-flight's image scan in a thread: SIGTERM still ends the process, at once."""
    root = _image_folder(tmp_path / "images", classes=4, per_class=4)
    os.mkfifo(root / "train" / "class_0" / "stuck.png")
    run_dir = tmp_path / "run"
    folder = {"data.dataset": "folder", "data.root": root}
    process = start(run_dir, teacher_checkpoint, **folder, **{"augment.repeated_aug": False})
    wait_for_log(run_dir, "checking", process)  # the scan has started (and blocks)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM before the first step" in _one_error_line(err)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("cskd ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def test_a_second_run_on_a_live_run_directory_is_refused_and_a_dead_one_is_taken_over(
    tmp_path, teacher_checkpoint, reference
):
    run_dir = tmp_path / "run"
    first = start(run_dir, teacher_checkpoint, hold_at=2)  # held until both are refused
    wait_for_step(run_dir, 1, first)
    for second in ({"train.resume": "auto"}, {"train.overwrite": True}):
        refused = run(run_dir, teacher_checkpoint, **second)
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert refused.returncode == 2, refused.stderr[-2000:]
        line = _one_error_line(refused.stderr)
        assert f"in use by a live run (process {first.pid} on " in line, line
    release(run_dir)
    _, err = first.communicate(timeout=HANG)
    assert first.returncode == 0, err
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # no second writer's lines
    assert_same_run(run_dir, reference)
    assert not (run_dir / ".cskd.lock").exists(), "the lock outlived its run"

    # a run killed outright leaves its lock; the next run reports it and takes it over
    killed_dir = tmp_path / "killed"
    process = start(killed_dir, teacher_checkpoint, hold_at=3)
    wait_until_held(killed_dir, process)
    process.kill()
    process.communicate(timeout=HANG)
    release(killed_dir)
    assert (killed_dir / ".cskd.lock").exists()
    resumed = run(killed_dir, teacher_checkpoint, **{"train.resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"taking over the lock of a dead run: process {process.pid} on " in resumed.stderr
    # and the run's own log keeps it, before the resumed run's lines
    log = (killed_dir / "train.log").read_text()
    taken = log.index(f"taking over the lock of a dead run: process {process.pid} on ")
    assert taken < log.rindex("resumed from")
    assert not (killed_dir / ".cskd.lock").exists()


def test_a_failed_run_leaves_no_directory_behind(tmp_path, teacher_checkpoint):
    run_dir = tmp_path / "run"
    failed = run(run_dir, teacher_checkpoint, **{"teacher.checkpoint": tmp_path / "absent.pth"})
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "absent.pth" in _one_error_line(failed.stderr)
    assert not run_dir.exists(), list(run_dir.iterdir())


def test_an_output_dir_that_is_a_file_or_cannot_be_created_is_one_line(
    tmp_path, tiny_run, monkeypatch, capsys
):
    (tmp_path / "run").write_text("not a directory")
    assert main(["train", *tiny_run()]) == 2
    assert "is a file, not a directory" in _error_line(capsys)

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    overrides = tiny_run(**{"train.output_dir": tmp_path / "ro" / "run"})
    assert main(["train", *overrides]) == 2
    line = _error_line(capsys)
    assert "cannot create train.output_dir" in line and "Read-only file system" in line


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (ended, not yet reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_loader_worker_killed_mid_run_ends_the_run_in_one_line_and_it_resumes(
    tmp_path, teacher_checkpoint
):
    """What the kernel's OOM killer does to a loader worker: the run must exit (no hang), say
    in one line what happened and what to change, and keep last.pt to resume from."""
    run_dir = tmp_path / "run"
    process = start(run_dir, teacher_checkpoint, hold_at=3, **{"data.workers": 2})
    wait_until_held(run_dir, process)  # step 2's checkpoint is written (its log line: before)
    workers = _children(process.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + HANG
    while not _ended(workers[0]):  # dead before the run goes on: it meets the death next
        assert time.monotonic() < deadline, "a SIGKILLed worker never ended"
        time.sleep(0.02)
    release(run_dir)
    _, err = process.communicate(timeout=HANG)  # a hang fails here
    assert process.returncode == 2, err[-3000:]
    line = _one_error_line(err)
    assert "a data-loading worker died" in line and "data.workers" in line, line
    assert "train.resume=auto" in line, line
    assert "Traceback" not in err
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] >= 2
    resumed = run(run_dir, teacher_checkpoint, **{"train.resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def _image_folder(root: Path, *, classes: int, per_class: int) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(classes):
            directory = root / split / f"class_{label}"
            directory.mkdir(parents=True)
            for index in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(directory / f"{index}.png")
    return root


def test_a_corrupt_image_the_preflight_did_not_sample_is_one_line_from_a_worker(
    tmp_path, tiny_run, monkeypatch, capsys
):
    import cskd.training.preflight

    root = _image_folder(tmp_path / "images", classes=4, per_class=4)
    corrupt = root / "train" / "class_1" / "2.png"  # not among the 2 evenly spaced files checked
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"damaged" * 20)
    monkeypatch.setattr(cskd.training.preflight, "SCAN_LIMIT", 2)
    overrides = {
        "data.dataset": "folder",
        "data.root": root,
        "data.workers": 2,
        "augment.repeated_aug": False,
    }
    assert main(["train", *tiny_run(**overrides)]) == 2
    err = capsys.readouterr().err
    assert "2 train images checked" in err  # the pre-flight's sample missed the file
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert str(corrupt) in line and "data.skip_corrupt=true" in line, line
    assert "Traceback" not in line and "worker" not in line.split(str(corrupt))[0], line


# ---------------------------------------------------------------------------------- failures


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_non_finite_loss_names_the_step_and_parts_and_leaves_the_last_checkpoint(
    tmp_path, tiny_run, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    written = []  # sha256 of each checkpoint as it landed
    save = cskd.training.state.save_atomic

    def recording_save(obj, path):
        save(obj, path)
        written.append((Path(path).name, sha256(Path(path))))

    monkeypatch.setattr(cskd.training.state, "save_atomic", recording_save)
    overrides = {"optim.lr": 1e30, "train.checkpoint_interval": 1, "train.log_interval": 1}
    assert main(["train", *tiny_run(**overrides)]) == 2
    line = _error_line(capsys)
    assert written and all(name == "last.pt" for name, _ in written)
    step = len(written) + 1  # the checkpoints of steps 1..n landed; step n + 1 failed
    assert f"non-finite loss at step {step} (epoch 0): " in line
    for part in ("base=", "token=", "cskd=", "loss=nan"):
        assert part in line, part
    assert sha256(run_dir / "last.pt") == written[-1][1], "the last good checkpoint changed"
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] == step - 1
    assert logged_steps(run_dir) == list(range(1, step))


def test_disk_full_while_saving_is_one_clear_error_and_the_previous_checkpoint_survives(
    tmp_path, tiny_run, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    real_save = torch.save
    calls, before = [], {}

    def full_disk(obj, file, *args, **kwargs):
        calls.append(file)
        if len(calls) <= 2:  # the checkpoints of steps 1 and 2 land
            return real_save(obj, file, *args, **kwargs)
        before["last.pt"] = sha256(run_dir / "last.pt")
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[:4096])  # the disk fills up part-way through
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", *tiny_run(**{"train.checkpoint_interval": 1})]) == 2
    line = _error_line(capsys)
    assert f"could not write checkpoint {run_dir / 'last.pt'}: No space left on device" in line
    assert "the previous checkpoint is intact" in line
    assert sha256(run_dir / "last.pt") == before["last.pt"]
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] == 2
    assert not list(run_dir.glob(".*.tmp")), "the partial temporary file was left behind"


def test_a_full_disk_while_writing_config_or_metrics_is_one_line_and_last_pt_survives(
    tmp_path, tiny_run, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_run(**{"train.stop_after_steps": 2})]) == 0
    before = sha256(run_dir / "last.pt")
    replace = os.replace

    def full_for_config(source, target):
        if Path(target).name == "config.yaml":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", full_for_config)
        assert main(["train", *tiny_run(**{"train.resume": "auto"})]) == 2
    line = _error_line(capsys)
    assert f"could not write {run_dir / 'config.yaml'}: No space left on device" in line, line
    assert "last.pt" in line and sha256(run_dir / "last.pt") == before
    assert not list(run_dir.glob(".*.tmp"))

    opened = Path.open
    appends = []

    def full_after_a_while(self, mode="r", *args, **kwargs):
        file = opened(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and mode == "a":
            appends.append(self)
            if len(appends) > 1:
                file.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return file

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", full_after_a_while)
        assert main(["train", *tiny_run(**{"train.resume": "auto"})]) == 2
    line = _error_line(capsys)
    assert f"could not write {run_dir / 'metrics.jsonl'}: No space left on device" in line, line
    assert read_checkpoint(run_dir / "last.pt")["state"]["global_step"] >= 2


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_is_one_line_with_the_batch_size_and_the_knobs(
    tiny_run, monkeypatch, capsys, error
):
    from cskd.training.engine import Trainer

    def exhausted(self, batch, state):
        raise error

    monkeypatch.setattr(Trainer, "step", exhausted)
    assert main(["train", *tiny_run()]) == 2
    line = _error_line(capsys)
    assert "out of memory" in line and "data.batch_size=8" in line, line
    assert "train.amp" in line and "data.workers" in line, line


def test_truncated_or_damaged_checkpoints_are_refused_not_resumed(tmp_path, reference, capsys):
    good = (reference / "last.pt").read_bytes()
    weights = read_checkpoint(reference / "last.pt")["student"]["pos_embed"]
    offset = good.find(weights.numpy().tobytes())
    assert offset > 0
    damaged = bytearray(good)
    damaged[offset + 17] ^= 0x01  # one flipped bit in the student's weights
    cases = {
        "truncated": (good[: len(good) // 2], "cannot read checkpoint .* truncated, damaged"),
        "damaged": (bytes(damaged), "is damaged: its content does not match the digest"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)
    # through the command: the run directory's last.pt is damaged
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(bytes(damaged))
    teacher = read_checkpoint(reference / "last.pt")["config"]["teacher"]["checkpoint"]
    overrides = tiny_overrides(run_dir, teacher, **{**RUN, "train.resume": "auto"})
    assert main(["train", *overrides]) == 2
    assert "is damaged" in _error_line(capsys)


# ---------------------------------------------------------------------------------- untrusted


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _malicious_files(tmp_path: Path, marker: Path, state: dict) -> dict[str, Path]:
    files = {}
    obj = {"model": state, "extra": Payload(marker)}
    files["zip"] = tmp_path / "zip.pt"
    torch.save(obj, files["zip"])
    files["legacy"] = tmp_path / "legacy.pt"
    torch.save(obj, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"] = tmp_path / "plain.pkl"
    files["pickle"].write_bytes(pickle.dumps(obj, protocol=2))
    files["pickle5"] = tmp_path / "plain5.pkl"  # torch's unpickler stops at its first opcode
    files["pickle5"].write_bytes(pickle.dumps(obj, protocol=5))
    return files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the protocol-5 pickle
def test_a_malicious_pickle_is_refused_and_its_code_never_runs(
    tmp_path, tiny_run, teacher_checkpoint, capsys
):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.read_text() == "ran", "the payload must be live for this test to mean anything"

    marker = tmp_path / "pwned"
    teacher_state = torch.load(teacher_checkpoint, weights_only=True)
    files = _malicious_files(tmp_path, marker, teacher_state)
    for kind, path in files.items():
        refusal = "cannot read checkpoint" if kind == "pickle5" else "refused to load .* pickled"
        with pytest.raises(CheckpointError, match=refusal):
            read_file(path)
        assert not marker.exists(), kind

    # as the teacher checkpoint
    assert main(["train", *tiny_run(**{"teacher.checkpoint": str(files["zip"])})]) == 2
    line = _error_line(capsys)
    assert f"refused to load {files['zip']}" in line and "exec" in line
    # as the checkpoint a run resumes from: train.resume=<path>, and train.resume=auto
    resume_dir = tmp_path / "resumed"
    assert main(["train", *tiny_run(**{"train.resume": str(files["legacy"])})]) == 2
    assert f"refused to load {files['legacy']}" in _error_line(capsys)
    resume_dir.mkdir()
    (resume_dir / "last.pt").write_bytes(files["zip"].read_bytes())
    overrides = tiny_overrides(resume_dir, teacher_checkpoint, **{"train.resume": "auto"})
    assert main(["train", *overrides]) == 2
    assert "refused to load" in _error_line(capsys)
    assert not marker.exists()


def test_no_shell_anywhere_and_config_paths_are_taken_literally(
    tmp_path, tiny_run, monkeypatch, capsys
):
    source = Path(__file__).parents[2] / "src" / "cskd"
    forbidden = re.compile(
        r"os\.system|os\.popen|shell\s*=\s*True|subprocess|(?<![.\w])(eval|exec)\("
    )
    for path in source.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{path.name}:{number}: {line.strip()}"

    monkeypatch.chdir(tmp_path)
    odd = "$(touch pwned)`touch pwned2`~"
    run_dir = tmp_path / "runs" / odd
    overrides = tiny_run(**{"train.output_dir": str(run_dir), "teacher.checkpoint": f"{odd}/t.pth"})
    assert main(["train", *overrides]) == 2
    assert f"checkpoint {odd}/t.pth does not exist" in _error_line(capsys)
    assert not run_dir.exists(), "a failed run left its new directory behind"
    overrides = tiny_run(**{"train.output_dir": str(run_dir), "optim.epochs": 1})
    assert main(["train", *overrides, "optim.warmup_epochs=0"]) == 0
    assert (run_dir / "last.pt").is_file(), "the run did not write under the literal name"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_resume_with_fewer_epochs_than_already_trained_is_refused_and_changes_nothing(
    tmp_path, teacher_checkpoint, reference, capsys
):
    """A finished 3-epoch run resumed with optim.epochs=2 would train nothing and rewrite its
    config and final metrics as a 2-epoch run: refused in one line, every file left as it was."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p.relative_to(run_dir): sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    overrides = tiny_overrides(
        run_dir, teacher_checkpoint, **{**RUN, "optim.epochs": 2, "train.resume": "auto"}
    )
    assert main(["train", *overrides]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "3 epochs" in line and "optim.epochs=2" in line, line
    after = {p.relative_to(run_dir): sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    log = Path("train.log")  # appended to: the refused attempt is on record
    assert (run_dir / log).read_bytes().startswith((reference / log).read_bytes())
    assert {k: v for k, v in after.items() if k != log} == {
        k: v for k, v in before.items() if k != log
    }
