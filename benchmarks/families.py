"""Which timm families cskd serves: one model per family (timm module), as a teacher and as a
student, under DeiT distillation and under CSKD.

For each family of the installed timm the smallest model (parameters counted on the meta device,
among names that say tiny/small/nano...) is built with random weights at 10 classes, then:

- teacher, ``deit``: ``DenseTeacher(global_only=True)`` gives (N, K) logits;
- teacher, ``cskd``: ``DenseTeacher`` checks that its dense logits average to its output (a head
  affine after global pooling) and gives (N, K, H, W);
- student, ``deit``: the wrapped student gives class logits;
- student, ``cskd``: a ViT with a patch grid (``DenseStudent``) or a model ending in a map
  (``MapStudent``) gives dense logits; what cannot is refused by the same check ``cskd train``
  runs before anything is built.

Each cell is ``yes`` or the one-line refusal a user would get; a traceback would be a bug and is
recorded as ``BUG: ...``. Writes ``docs/results/families.{json,md}``.

    python benchmarks/families.py --threads 1                   # about 10 min, 98 families
    python benchmarks/families.py --families resnet vision_transformer --results-dir /tmp/f
    python benchmarks/families.py --families gemma4_vit --update      # those rows again
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import timm
import torch

from cskd.errors import USER_ERRORS
from cskd.method.adapters import (
    DenseTeacher,
    DistilledStudent,
    is_vit,
    map_student_problem,
    patch_logits_problem,
    wrap_student,
)
from cskd.training.preflight import no_classifier

SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "_s", "b0", "t")
CANDIDATES = 8  # models per family whose size is compared
COLUMNS = ("teacher deit", "teacher cskd", "student deit", "student cskd")
CELL = 160  # characters of a refusal shown in the table; the page lists each one whole below it


def smallest(family: str) -> str | None:
    """The family's model with the fewest parameters among up to CANDIDATES names, those that
    say small first (counted on the meta device: no memory, no weights)."""
    names = timm.list_models(module=family)
    names = sorted(names, key=lambda n: (not any(k in n for k in SMALL), len(n), n))[:CANDIDATES]
    sizes = {}
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=10)
            sizes[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - a name that does not build is not a candidate
            continue
    return min(sizes, key=sizes.get) if sizes else None


def build(name: str) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    return model, size


def outcome(check) -> str:
    """``yes``, the one-line refusal of a user error, or ``BUG: ...`` for anything else."""
    try:
        check()
        return "yes"
    except USER_ERRORS as error:
        return "no: " + " ".join(str(error).split())
    except Exception as error:  # noqa: BLE001 - recorded: a traceback is what the table finds
        return f"BUG: {type(error).__name__}: " + " ".join(str(error).split())


def student_cskd(name: str) -> None:
    """What ``cskd train`` checks before building (``preflight.check_models``), then a forward."""
    from cskd.errors import ConfigError

    model, size = build(name)
    if is_vit(model):
        problem = patch_logits_problem(model)
    else:
        problem = map_student_problem(model, size, in_chans=3)
    if problem is not None:
        raise ConfigError(problem)
    student = wrap_student(model, method="cskd")
    assert isinstance(student, DistilledStudent)
    with torch.no_grad():
        output = student(torch.randn(2, 3, size, size))
    assert output.patch_logits.shape[0] == 2 and output.patch_logits.shape[-1] == 10


def check_family(family: str) -> dict:
    name = smallest(family)
    if name is None:
        return {"family": family, "model": None}
    model, size = build(name)
    images = torch.randn(2, 3, size, size)
    if no_classifier(model):  # what preflight.check_models refuses, for either role
        refusal = f"no: {name} builds no classifier head (timm gives it num_classes=0: an encoder)"
        return {
            "family": family,
            "model": name,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input": size,
            **dict.fromkeys(COLUMNS, refusal),
            "seconds": 0.0,
        }

    def teacher(global_only: bool) -> None:
        model = build(name)[0]  # in_chans from the build, as load_teacher passes it
        wrapped = DenseTeacher(model, check_size=size, global_only=global_only, in_chans=3)
        with torch.no_grad():
            output = wrapped(images)
        assert output.global_logits.shape == (2, 10)

    def student_deit() -> None:
        with torch.no_grad():
            output = wrap_student(build(name)[0], method="deit")(images)
        assert output.cls_logits.shape == (2, 10)

    started = time.perf_counter()
    row = {
        "family": family,
        "model": name,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input": size,
        "teacher deit": outcome(lambda: teacher(True)),
        "teacher cskd": outcome(lambda: teacher(False)),
        "student deit": outcome(student_deit),
        "student cskd": outcome(lambda: student_cskd(name)),
    }
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def shorten(text: str) -> str:
    return text if len(text) <= CELL else text[: CELL - 1] + "…"


def report(rows: list[dict], *, command: str) -> str:
    counted = [r for r in rows if r.get("model")]
    totals = {c: sum(r[c] == "yes" for r in counted) for c in COLUMNS}
    bugs = sum(r[c].startswith("BUG") for r in counted for c in COLUMNS)
    lines = [
        "# timm families as teachers and students",
        "",
        f"- Command: `{command}`",
        f"- timm {timm.__version__}, torch {torch.__version__}; one model per family (the smallest "
        "of its small-named models), random weights, 10 classes, at its default input size",
        f"- Served, of {len(counted)} families: "
        + ", ".join(f"{c} {totals[c]}" for c in COLUMNS)
        + f"; tracebacks (bugs): {bugs}",
        "",
        "`yes`: works. `no: ...`: the one-line refusal a user gets (exit 2 from `cskd`), cut at "
        f"{CELL} characters in the table and given whole, with its fix, under it.",
        "",
        "| family | model | M params | " + " | ".join(COLUMNS) + " |",
        "|---" * (3 + len(COLUMNS)) + "|",
    ]
    for r in counted:
        cells = [shorten(r[c].replace("|", "/")) for c in COLUMNS]
        lines.append(
            f"| {r['family']} | `{r['model']}` | {r['parameters_m']} | " + " | ".join(cells) + " |"
        )
    refusals = [(r, c) for r in counted for c in COLUMNS if len(r[c]) > CELL]
    if refusals:
        lines += ["", "## Refusals in full", ""]
        lines += [f"- {r['family']}, {c}: {r[c].replace('|', '/')}" for r, c in refusals]
    skipped = [r["family"] for r in rows if not r.get("model")]
    if skipped:
        lines += ["", f"No model of these families builds with 10 classes: {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", help="timm modules (default: every one)")
    parser.add_argument(
        "--update", action="store_true", help="replace only these families' rows of families.json"
    )
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("timm").setLevel(logging.ERROR)
    families = args.families or timm.list_modules()
    rows = []
    for family in families:
        rows.append(check_family(family))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/families.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    record = {"command": command.strip(), "updates": [], "rows": rows}
    if args.update and (out / "families.json").exists():
        record = json.loads((out / "families.json").read_text())
        fresh = {row["family"]: row for row in rows}
        record["rows"] = [fresh.pop(r["family"], r) for r in record["rows"]] + list(fresh.values())
        record["updates"].append(command.strip())
    (out / "families.json").write_text(json.dumps(record, indent=1) + "\n")
    commands = " ; then ".join([record["command"], *record["updates"]])
    (out / "families.md").write_text(report(record["rows"], command=commands))
    print(f"wrote {out / 'families.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
