"""Several processes on the CPU: real ``torchrun`` runs and spawned Gloo process groups (loopback).

The torchrun tests launch ``torchrun --standalone --nproc_per_node=2 -m cskd train`` exactly as
docs/distributed.md shows, with the tiny synthetic run of conftest. The spawned group runs the
collective pieces (DDP gradients, sharded evaluation, agreed failures) in one start-up.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import HANG, tiny_overrides
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from cskd.cli import main
from cskd.config import load_config
from cskd.data import DataError
from cskd.data.sampling import EpochSampler, ShardSampler, eval_loader, resume_step
from cskd.errors import ConfigError, NonFiniteLossError
from cskd.infra import distributed
from cskd.method.adapters import rules_for
from cskd.method.distiller import Distiller, normalizer
from cskd.method.losses import ObjectiveWeights
from cskd.training.build import build_optimization, scaled_lr
from cskd.training.engine import Trainer
from cskd.training.evaluation import evaluate
from cskd.training.models import build_student, build_teacher
from cskd.training.state import TrainState

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN_OUTPUTS = {
    "best.pt",
    "config.yaml",
    "final_metrics.json",
    "last.pt",
    "metrics.jsonl",
    "student.safetensors",
    "student_ema.safetensors",
    "tensorboard",
    "train.log",
}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free localhost port), stopped as a
    hang after HANG seconds."""
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args],
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


# ------------------------------------------------------------------------------ torchrun runs


def test_two_process_run_writes_the_outputs_of_a_single_process_run_once(
    tmp_path, teacher_checkpoint
):
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun("-m", "cskd", "train", *tiny_overrides(two, teacher_checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", *tiny_overrides(one, teacher_checkpoint)]) == 0

    assert {path.name for path in two.iterdir()} == {path.name for path in one.iterdir()}
    assert {path.name for path in two.iterdir()} == RUN_OUTPUTS
    assert len(list((two / "tensorboard").iterdir())) == 1, "only rank 0 writes TensorBoard"
    assert not list(two.glob("*.tmp"))

    # rank 0 alone wrote the log and the metrics: every line once
    log = (two / "train.log").read_text()
    assert [line.split(" loss ")[0][9:] for line in log.splitlines() if "| top-1" in line] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert "2 process(es) on cpu | effective batch 16 (= 8 x 2)" in log
    assert [record["epoch"] for record in records(two, "epoch")] == [0, 1]
    steps = [record["step"] for record in records(two, "step")]
    assert steps == sorted(set(steps))

    # 32 images: 2 steps of 2 x 8 per epoch instead of 4 of 8; the lr scales with the batch
    two_state = torch.load(two / "last.pt", weights_only=True)
    one_state = torch.load(one / "last.pt", weights_only=True)
    assert two_state["state"]["global_step"] == 4 and one_state["state"]["global_step"] == 8
    assert two_state["global_batch"] == 16 and one_state["global_batch"] == 8
    base_lr = 5e-4  # the default optim.lr at optim.lr_batch_reference 512
    for state, global_batch in [(two_state, 16), (one_state, 8)]:
        for lr in state["scheduler"]["base_values"]:  # one per parameter group
            assert lr == pytest.approx(base_lr * global_batch / 512)

    # the 8 validation images are counted once, not once per rank
    assert json.loads((two / "final_metrics.json").read_text())["last_epoch"]["images"] == 8


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, teacher_checkpoint):
    run_dir = tmp_path / "run"
    common = {"train.log_interval": 1}
    stopped = tiny_overrides(run_dir, teacher_checkpoint, **common, **{"train.stop_after_steps": 3})
    result = torchrun("-m", "cskd", "train", *stopped)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    position = {key: saved["state"][key] for key in ("epoch", "step_in_epoch", "global_step")}
    assert position == {"epoch": 1, "step_in_epoch": 1, "global_step": 3}
    assert saved["global_batch"] == 16

    # one process, more epochs: 16 of epoch 1's 32 images were used, so it resumes at step 2 of 4
    more = {**common, "train.resume": "auto", "optim.epochs": 3}
    assert main(["train", *tiny_overrides(run_dir, teacher_checkpoint, **more)]) == 0
    log_text = (run_dir / "train.log").read_text()
    assert "global batch 16 -> 8" in log_text and "from epoch 1 step 2 of 4" in log_text
    steps = records(run_dir, "step")
    assert [record["step"] for record in steps] == list(range(1, 10))
    assert [record["epoch"] for record in steps] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [record["epoch"] for record in records(run_dir, "epoch")] == [0, 1, 2]
    final = torch.load(run_dir / "last.pt", weights_only=True)
    assert final["state"]["epoch"] == 3 and final["state"]["global_step"] == 9
    assert (run_dir / "student.safetensors").is_file()

    # after the resume the lr follows the one-process schedule (4 steps per epoch, 3 epochs)
    config = load_config(None, tiny_overrides(run_dir, teacher_checkpoint, **more))
    student = build_student(config)
    _, scheduler = build_optimization(
        config.optim, student, lr=scaled_lr(config.optim, 8), steps_per_epoch=4
    )
    for record, position in zip(steps[3:], [7, 8, 9, 10, 11, 12], strict=True):
        scheduler.step_update(num_updates=position)  # epoch x 4 + steps done in the epoch
        assert record["lr"] == pytest.approx(scheduler.optimizer.param_groups[0]["lr"])


def test_a_two_process_stop_and_resume_ends_exactly_like_the_uninterrupted_run(
    tmp_path, teacher_checkpoint
):
    """Every rank saves and restores its own random streams (drop path, Mixup, erasing draw
    from them): a stopped and resumed 2-rank run equals the uninterrupted one, tensor for
    tensor. Before, ranks other than 0 started new streams on resume (max difference 1.2e-4)."""
    from safetensors.torch import load_file

    random_run = {
        "augment.mixup": 0.8,
        "augment.cutmix": 1.0,
        "augment.reprob": 0.25,
        "student.drop_path": 0.1,
        "optim.lr": 0.05,
        "train.ema": True,
    }
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result = torchrun(
        "-m", "cskd", "train", *tiny_overrides(whole, teacher_checkpoint, **random_run)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stop = {**random_run, "train.stop_after_steps": 3}
    result = torchrun("-m", "cskd", "train", *tiny_overrides(parts, teacher_checkpoint, **stop))
    assert result.returncode == 0, result.stderr[-3000:]
    resume = {**random_run, "train.resume": "auto"}
    result = torchrun("-m", "cskd", "train", *tiny_overrides(parts, teacher_checkpoint, **resume))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("student.safetensors", "student_ema.safetensors"):
        expected, got = load_file(str(whole / name)), load_file(str(parts / name))
        differing = [key for key in expected if not torch.equal(expected[key], got[key])]
        assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def test_a_teacher_file_replaced_between_stop_and_resume_is_refused(
    tmp_path, tiny_run, teacher_checkpoint, capsys
):
    import shutil

    teacher = tmp_path / "teacher.pth"
    shutil.copy(teacher_checkpoint, teacher)
    assert (
        main(["train", *tiny_run(**{"teacher.checkpoint": teacher, "train.stop_after_steps": 2})])
        == 0
    )
    state = torch.load(teacher)
    state["fc.bias"] += 1.0  # other weights at the same path
    torch.save(state, teacher)
    capsys.readouterr()
    resume = {"teacher.checkpoint": teacher, "train.resume": "auto"}
    assert main(["train", *tiny_run(**resume)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and str(teacher) in lines[0] and "other weights" in lines[0], lines


FAILING_ENTRY_POINT = """
import os, sys
from cskd.cli import main
from cskd.training import engine

if os.environ["RANK"] == "1":  # rank 1 dies in its second step; rank 0 is left waiting
    step = engine.Trainer.step

    def failing_step(self, batch, state):
        if state.global_step == 1:
            raise RuntimeError("injected failure")
        return step(self, batch, state)

    engine.Trainer.step = failing_step
sys.exit(main())
"""


def test_a_rank_that_fails_stops_the_whole_job_quickly(tmp_path, teacher_checkpoint):
    entry_point = tmp_path / "failing_cskd.py"
    entry_point.write_text(FAILING_ENTRY_POINT)
    run_dir = tmp_path / "run"
    # the collective timeout is twice the hang guard: a job that waited for it would be stopped
    # by torchrun()'s guard first, and fail here, however fast the machine
    timeout = {"train.dist_timeout_s": 2 * HANG}
    result = torchrun(
        str(entry_point), "train", *tiny_overrides(run_dir, teacher_checkpoint, **timeout)
    )
    assert result.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure" in result.stderr
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)", result.stderr)  # torchrun's summary
    assert not (run_dir / "last.pt").exists() and not (run_dir / "student.safetensors").exists()


# ------------------------------------------------------------------------------ spawned group


class NumberedImages(Dataset):
    """Fixed images with given targets, as the loaders' ``{"image", "target"}`` dicts."""

    def __init__(self, images: torch.Tensor, targets: list[int]) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "target": self.targets[index]}


def one_rank_batch(rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    return {
        "image": torch.rand(4, 3, 32, 32, generator=generator),
        "target": torch.randint(0, 4, (4,), generator=generator),
    }


class NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass


def tiny_config(work_dir: Path, teacher_checkpoint: str):
    overrides = tiny_overrides(
        work_dir / "unused", teacher_checkpoint, **{"student.drop_path": 0.0}
    )
    return load_config(None, overrides)


def step_trainer(config, student, teacher) -> Trainer:
    device = torch.device("cpu")
    student_norm = normalizer(config.data.mean, config.data.std, device)
    distiller = Distiller(student, teacher, ObjectiveWeights(), student_norm=student_norm)
    return Trainer(
        distiller=distiller,
        optimizer=torch.optim.SGD(distiller.parameters(), lr=0.1),
        scheduler=NoSchedule(),
        device=device,
        epochs=1,
        steps_per_epoch=1,
        progress_unit="epoch",
        student_norm=student_norm,
    )


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten() for tensor in tensors])


def gradient_scenario(rank: int, config) -> dict:
    """One DDP step on a different batch per rank; rank 0 also computes the joint batch alone."""
    torch.manual_seed(0)
    student, teacher = build_student(config), build_teacher(config)
    alone = copy.deepcopy(student)
    trainer = step_trainer(config, DistributedDataParallel(student), teacher)
    trainer.step(one_rank_batch(rank), TrainState())
    result = {
        "grad": flat(parameter.grad for parameter in student.parameters()),
        "weights": flat(student.parameters()),
    }
    if rank == 0:
        reference = step_trainer(config, alone, teacher)
        both = [one_rank_batch(0), one_rank_batch(1)]
        images, targets, _ = reference.prepare(
            {key: torch.cat([batch[key] for batch in both]) for key in both[0]}
        )
        loss, _ = reference.distiller(images, targets, 0.0)
        loss.backward()
        result["joint_batch_grad"] = flat(parameter.grad for parameter in alone.parameters())
    return result


def failure_scenarios(rank: int, config) -> dict:
    """A NaN loss on rank 1 only, a set-up error on rank 1 only, ranks that disagree."""
    outcome = {}
    torch.manual_seed(0)
    student, teacher = build_student(config), build_teacher(config)
    trainer = step_trainer(config, DistributedDataParallel(student), teacher)
    batch = one_rank_batch(rank)
    if rank == 1:
        batch["image"][0, 0, 0, 0] = float("nan")
    try:
        trainer.step(batch, TrainState())
    except NonFiniteLossError as error:
        outcome["nan"] = str(error)

    def read_data():
        if rank == 1:
            raise DataError("data.root /missing does not exist on this node")
        return "data"

    try:
        distributed.together(read_data)
    except (DataError, distributed.DistributedError) as error:
        outcome["set_up"] = f"{type(error).__name__}: {error}"
    try:
        distributed.check_same(rank, what="the answer", fix="ask again")
    except distributed.DistributedError as error:
        outcome["disagree"] = str(error)
    outcome["any_rank"] = distributed.any_rank(rank == 1)
    return outcome


def evaluation_scenario(rank: int, config, work_dir: Path) -> dict:
    student = build_student(config)
    student.load_state_dict(torch.load(work_dir / "student.pt", weights_only=True))
    images, targets = torch.load(work_dir / "val.pt", weights_only=True)
    loader = eval_loader(
        NumberedImages(images, targets),
        batch_size=4,
        workers=0,
        rank=rank,
        world_size=2,
        pin_memory=False,
    )
    norm = normalizer(config.data.mean, config.data.std, torch.device("cpu"))
    rules = rules_for(student)
    return evaluate(student, loader, rules=rules, device=torch.device("cpu"), student_norm=norm)


def group_worker(rank: int, port: int, work_dir: Path, teacher_checkpoint: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    info = distributed.init_distributed(device="cpu", backend="auto", timeout_s=HANG)
    config = tiny_config(work_dir, teacher_checkpoint)
    results = {
        "backend": torch.distributed.get_backend(),
        "gradients": gradient_scenario(rank, config),
        "failures": failure_scenarios(rank, config),
        "evaluation": evaluation_scenario(rank, config, work_dir),
    }
    torch.save(results, work_dir / f"rank{info.rank}.pt")
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def group(tmp_path_factory, teacher_checkpoint) -> dict:
    """Run every scenario in a 2-process Gloo group; returns the single-process reference too."""
    work_dir = tmp_path_factory.mktemp("group")
    config = tiny_config(work_dir, teacher_checkpoint)
    torch.manual_seed(1)
    student = build_student(config).eval()
    torch.save(student.state_dict(), work_dir / "student.pt")
    # 13 validation images (not a multiple of 2); "cls" is right on the 7 even indices only
    images = torch.rand(13, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    norm = normalizer(config.data.mean, config.data.std, torch.device("cpu"))
    with torch.no_grad():
        predicted = student((images - norm[0]) / norm[1]).cls_logits.argmax(dim=1).tolist()
    targets = [
        label if index % 2 == 0 else (label + 1) % 4 for index, label in enumerate(predicted)
    ]
    torch.save((images, targets), work_dir / "val.pt")
    reference = evaluate(
        student,
        eval_loader(
            NumberedImages(images, targets),
            batch_size=4,
            workers=0,
            rank=0,
            world_size=1,
            pin_memory=False,
        ),
        rules=rules_for(student),
        device=torch.device("cpu"),
        student_norm=norm,
    )

    context = mp.start_processes(
        group_worker,
        args=(free_port(), work_dir, teacher_checkpoint),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + HANG
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process group did not finish within {HANG} s (a hang)")
    ranks = [torch.load(work_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return {"ranks": ranks, "reference": reference}


def test_gradients_are_identical_across_ranks_after_a_step(group):
    rank0, rank1 = (ranks["gradients"] for ranks in group["ranks"])
    assert group["ranks"][0]["backend"] == "gloo"  # train.dist_backend=auto on the CPU
    assert torch.equal(rank0["grad"], rank1["grad"])
    assert torch.equal(rank0["weights"], rank1["weights"])
    # the all-reduced gradient is the gradient of the mean loss over both ranks' batches
    joint = rank0["joint_batch_grad"]
    assert rank0["grad"].abs().max() > 0
    torch.testing.assert_close(rank0["grad"], joint, rtol=1e-4, atol=1e-6)


def test_distributed_evaluation_counts_each_image_once(group):
    reference = group["reference"]
    assert reference["images"] == 13
    assert reference["cls"]["top1"] == pytest.approx(100 * 7 / 13)
    for ranks in group["ranks"]:
        assert ranks["evaluation"] == reference  # both ranks hold the all-reduced metrics


def test_a_failure_on_one_rank_is_raised_on_every_rank(group):
    rank0, rank1 = (ranks["failures"] for ranks in group["ranks"])
    assert rank1["nan"].startswith("non-finite loss at ") and "loss=nan" in rank1["nan"]
    assert rank0["nan"].startswith("non-finite loss (on another rank) at ")
    assert rank1["set_up"] == "DataError: data.root /missing does not exist on this node"
    assert rank0["set_up"].startswith("DistributedError: rank 1 failed in read_data")
    assert rank0["disagree"] == rank1["disagree"]
    assert rank0["disagree"] == "the ranks disagree on the answer (from 0 to 1): ask again"
    assert rank0["any_rank"] is rank1["any_rank"] is True


# ------------------------------------------------------------------------------ samplers


def test_shards_cover_every_validation_image_once():
    for world_size in (2, 3, 4):
        shards = [list(ShardSampler(13, rank=r, world_size=world_size)) for r in range(world_size)]
        assert sorted(sum(shards, [])) == list(range(13))


@pytest.mark.parametrize("repeats", [1, 3])
def test_resuming_with_another_world_size_keeps_the_epochs_images(repeats):
    dataset = list(range(40))

    def order(world_size: int, rank: int, start: int = 0) -> list[int]:
        sampler = EpochSampler(dataset, seed=5, rank=rank, world_size=world_size, repeats=repeats)
        sampler.set_epoch(3, start=start)
        return [index for index, _ in sampler]

    # 2 ranks x batch 4 stopped after 3 steps; 1 process x batch 4 takes over
    consumed = order(2, 0)[:12] + order(2, 1)[:12]
    step = resume_step(3, saved_global_batch=8, global_batch=4)
    assert step == 6
    whole_epoch = order(1, 0)
    assert sorted(consumed) == sorted(whole_epoch[: step * 4])
    assert sorted(consumed + order(1, 0, start=step * 4)) == sorted(whole_epoch)


# ------------------------------------------------------------------------------ set-up errors


def test_device_and_backend_mistakes_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        distributed.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="use train.device=cuda"):
        distributed.resolve_device("cuda:1", local_rank=0, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dist_backend=nccl needs GPUs"):
        distributed.init_distributed(device="cpu", backend="nccl", timeout_s=60)


RANK_WEIGHTS = """
import os, sys, torch
from cskd.config import load_config
from cskd.training import run

original = run.EpochLoop.train_one_epoch

def keep(self, batches):  # every rank saves the weights it holds after each epoch
    means = original(self, batches)
    student = getattr(self.trainer.distiller.student, "module", self.trainer.distiller.student)
    torch.save(student.state_dict(), os.environ["WEIGHTS_DIR"] + "/rank" + os.environ["RANK"] + ".pt")
    return means

run.EpochLoop.train_one_epoch = keep
run.train(load_config(None, sys.argv[1:]))
"""


def test_every_rank_ends_with_the_same_weights(tmp_path, teacher_checkpoint, monkeypatch):
    """DDP averages the gradients: two ranks that trained on different images hold identical
    weights at the end. A step that bypassed the DDP wrapper would let them drift apart."""
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS)
    overrides = tiny_overrides(tmp_path / "run", teacher_checkpoint, **{"optim.epochs": 1})
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path))
    result = torchrun(str(script), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    config = load_config(None, overrides)
    torch.manual_seed(config.train.seed)
    initial = build_student(config).state_dict()
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(first[key], initial[key])  # it trained
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)
