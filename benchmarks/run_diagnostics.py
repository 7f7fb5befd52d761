"""The diagnostics a regime's runs recorded (``train.diagnostics=true``), per method and epoch,
mean over seeds: how often the students' patch predictions equal the teacher's local answer, its
global answer and the CKF target, their attention distance, and the teacher map's agreement with
its own global answer. Reads each run's ``metrics.jsonl``; trains nothing.

    python benchmarks/run_diagnostics.py RUNS_DIR --output docs/results/NAME.md

``RUNS_DIR`` holds a regime's run folders (``deit-seed0``, ``cskd-linear-seed1``, ...), as
``benchmarks/regimes.py --output-dir`` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

MEASURES = (  # column -> (section of the diagnostics record, key)
    ("follows local", "student", "follows_local"),
    ("follows global", "student", "follows_global"),
    ("follows CKF target", "student", "follows_ckf_target"),
)


def per_epoch(run_dir: Path) -> dict[int, dict]:
    """{epoch (from 1): the diagnostics record} of one run."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").open())
    return {r["epoch"] + 1: r["diagnostics"] for r in records if "diagnostics" in r}


def table(runs_dir: Path) -> list[str]:
    by_method: dict[str, list[dict[int, dict]]] = defaultdict(list)
    for run_dir in sorted(runs_dir.glob("*-seed*")):
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "final_metrics.json").exists():
            by_method[run_dir.name.rsplit("-seed", 1)[0]].append(per_epoch(run_dir))
    columns = [name for name, _, _ in MEASURES] + ["attention distance (px)"]
    lines = [
        "Percent of the student's patch predictions (on the teacher's grid) equal to each target, "
        "and the mean attention distance over blocks; mean over the finished seeds (n).",
        "",
        "| method | n | epoch | a(t) | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    teacher = None
    for method, runs in by_method.items():
        for epoch in sorted(set.intersection(*(set(run) for run in runs))):
            records = [run[epoch] for run in runs]
            cells = [
                statistics.mean(r[section][key] for r in records) for _, section, key in MEASURES
            ]
            cells.append(statistics.mean(statistics.mean(r["attention_distance"]) for r in records))
            shown = " | ".join(f"{value:.1f}" for value in cells)
            a_t = records[0]["local_weight"]
            lines.append(f"| {method} | {len(runs)} | {epoch} | {a_t:.2f} | {shown} |")
            teacher = records[0]["teacher"]
    if teacher:
        lines += [
            "",
            f"The teacher's map (the same probe): right at {teacher['local_top1']:.1f}% of cells "
            f"({teacher['object_local_top1']:.1f}% of object cells, "
            f"{teacher['background_local_top1']:.1f}% of background cells), its global answer "
            f"right at {teacher['global_top1']:.1f}% of images, and its cells agree with its "
            f"global answer at {teacher['local_agrees_with_global']:.1f}%.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--output", type=Path, help="also write the table there (Markdown)")
    arguments = parser.parse_args(argv)
    if not arguments.runs_dir.is_dir():
        print(f"run_diagnostics: {arguments.runs_dir} is not a directory", file=sys.stderr)
        return 2
    command = "python benchmarks/run_diagnostics.py " + " ".join(argv or sys.argv[1:])
    text = "\n".join([f"- Command: `{command}`", "", *table(arguments.runs_dir)]) + "\n"
    print(text)
    if arguments.output:
        arguments.output.write_text(f"# Diagnostics of {arguments.runs_dir.name}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
