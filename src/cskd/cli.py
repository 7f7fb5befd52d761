"""The ``cskd`` command: a thin table onto the API: :mod:`cskd.training.run` and :mod:`cskd.commands`.

Errors a user can fix (bad config, missing data, unreadable checkpoint, impossible grid) are
printed as one line on stderr with exit status 2; anything else keeps its traceback. Under
torchrun the line names the rank, and only rank 0 prints results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import Config, describe, dump_config, load_config
from .errors import USER_ERRORS, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cskd",
        description="Cumulative Spatial Knowledge Distillation (CSKD, ICCV 2023) on timm: train, "
        "cache the teacher, evaluate, diagnose, or run the Fashion-MNIST demo. Each command's "
        "--help lists its options; `cskd train --help` every config key.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train (or resume) a run",
        description="Train (or resume) a run from a recipe plus section.key=value overrides. "
        "Config keys, their defaults and meanings:",
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML recipe (configs/...)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    cache = commands.add_parser(
        "cache",
        help="run the teacher once over the training set and store its responses",
        description="Build (or complete) the teacher cache at teacher.cache for a recipe: the "
        "teacher's dense logits of every training image. Train with the same recipe and "
        "teacher.cache to skip the teacher in every step. Resumable; shards split over ranks "
        "under torchrun.",
    )
    cache.add_argument("--config", help="YAML recipe (configs/...)")
    cache.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show = commands.add_parser(
        "config", help="print the resolved config (recipe, its bases, overrides and defaults)"
    )
    show.add_argument("--config", help="YAML recipe (default: the defaults alone)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint; prints JSON")
    evaluate.add_argument("--config", help="YAML recipe (default: the checkpoint's own config)")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument(
        "--classes-by-name",
        action="store_true",
        help="data whose classes are some of the model's: score each image under the model's "
        "label of its class name, compared ignoring case and punctuation (a folder T-shirt_top is "
        "the class T-shirt/top); without it, other class names are refused",
    )
    evaluate.add_argument("overrides", nargs="*", help="section.key=value overrides")
    diagnose = commands.add_parser(
        "diagnose", help="teacher-map, student-agreement and attention diagnostics of a run"
    )
    diagnose.add_argument("run_dir", help="a run directory (holds config.yaml and last.pt)")
    diagnose.add_argument("--checkpoint", default="last.pt", help="file in the run directory")
    diagnose.add_argument("--images", type=int, default=256, help="validation images measured")
    diagnose.add_argument("overrides", nargs="*", help="section.key=value overrides")
    demo = commands.add_parser("demo", help="the Fashion-MNIST demo: teacher, then students")
    demo.add_argument(
        "--output-dir", help="where the three runs go (default runs/demo, --quick: runs/demo-quick)"
    )
    demo.add_argument("--quick", action="store_true", help="a few steps of each run (tests)")
    return parser


RECIPES = Path(__file__).resolve().parents[2] / "configs"  # in a clone of the repository


def _recipe_config(args: argparse.Namespace) -> Config:
    """The config of ``train`` / ``cache``; ConfigError listing the shipped recipes when neither
    a recipe nor the data are given (the defaults alone are ImageNet's, without its path).
    Checked before the config is validated too: without a recipe, another error of the ImageNet
    defaults (``optim.epochs=1``, below their warm-up) would hide the missing recipe."""
    named = {override.split("=", 1)[0].strip() for override in args.overrides}
    if args.config is None and not named & {"data.root", "data.dataset"}:
        raise _needs_recipe(args.command)
    config = load_config(args.config, args.overrides)
    if args.config is None and config.data.dataset == "folder" and not config.data.root:
        raise _needs_recipe(args.command)
    return config


def _needs_recipe(command: str) -> ConfigError:
    folders: dict[str, list[str]] = {}
    for path in sorted(RECIPES.rglob("*.yaml")):
        if not path.name.startswith("_"):
            folders.setdefault(str(path.parent.relative_to(RECIPES.parent)), []).append(path.stem)
    shipped = [
        f"{folder}/{{{','.join(names)}}}.yaml" if len(names) <= 4 else f"{folder}/ ({len(names)})"
        for folder, names in folders.items()
    ]
    listed = f" (shipped: {'; '.join(shipped)})" if shipped else ""
    return ConfigError(
        f"cskd {command} needs a recipe: pass --config <recipe.yaml>{listed}, or set "
        "data.root to an image folder for the ImageNet defaults"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from .training.run import RunStopped, train

            try:
                train(_recipe_config(args))
            except RunStopped as stopped:
                print(f"cskd train: error: {stopped}", file=sys.stderr)
                return 128 + stopped.signum
        elif args.command == "cache":
            from .commands.cache import build_cache

            directory = build_cache(_recipe_config(args))
            if _rank() == 0:
                print(directory)
        elif args.command == "eval":
            from .commands.eval import evaluate_checkpoint

            config = load_config(args.config, args.overrides) if args.config else args.overrides
            metrics = evaluate_checkpoint(
                config, args.checkpoint, classes_by_name=args.classes_by_name
            )
            if _rank() == 0:
                print(json.dumps(metrics, indent=2))
        elif args.command == "config":
            from .training.preflight import check_models

            config = load_config(args.config, args.overrides)
            check_models(config)  # model names and kwargs, as train checks them
            print(dump_config(config), end="")
        elif args.command == "diagnose":
            from .commands.diagnose import diagnose_run

            result = diagnose_run(
                args.run_dir,
                checkpoint=args.checkpoint,
                images=args.images,
                overrides=args.overrides,
            )
            print(json.dumps(result["final"], indent=2))
            print(f"cskd diagnose: wrote {', '.join(result['files'])}", file=sys.stderr)
        elif args.command == "demo":
            from .commands.demo import run_demo

            run_demo(output_dir=args.output_dir, quick=args.quick)
    except USER_ERRORS as error:
        where = f" (rank {_rank()})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        message = " ".join(str(error).split("\n"))  # one line, whatever the error holds
        if len(message) > MAX_MESSAGE:  # a value quoted whole can run to megabytes
            message = f"{message[:MAX_MESSAGE]}... ({len(message):,} characters in all)"
        print(f"cskd {args.command}: error{where}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cskd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


MAX_MESSAGE = 2000  # characters of an error line


def _rank() -> int:
    """The global rank torchrun gave this process (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())
