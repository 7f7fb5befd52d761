"""The config schema: field metadata drives validation and ``describe()``; ``resolve`` is pure."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from cskd.config import (
    Config,
    describe,
    dump_config,
    from_dict,
    load_config,
    resolve,
    to_dict,
    validate,
)
from cskd.errors import ConfigError
from cskd.method.schedules import SCHEDULES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))
SHIPPED = [path for path in RECIPES if not path.name.startswith("_")]
PARTIALS = [path for path in RECIPES if path.name.startswith("_")]


def sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(Config)
    return [(item.name, hints[item.name]) for item in dataclasses.fields(Config)]


def schema_fields() -> list[tuple[str, dataclasses.Field]]:
    return [
        (f"{name}.{item.name}", item)
        for name, cls in sections()
        for item in dataclasses.fields(cls)
    ]


def test_the_configs_folder_ships_recipes():
    assert SHIPPED, f"no recipes found under {CONFIGS}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(CONFIGS)))
def test_every_shipped_recipe_loads_resolved_and_round_trips(path):
    config = load_config(path)
    assert config.student.inference_rule != "auto"
    assert config.train.best_rule.removeprefix("ema/") != "auto"
    assert dump_config(from_dict(to_dict(config))) == dump_config(config)


@pytest.mark.parametrize("partial", PARTIALS, ids=lambda path: str(path.relative_to(CONFIGS)))
def test_every_partial_recipe_is_the_base_of_a_recipe_that_loads(partial):
    children = [path for path in SHIPPED if partial in base_chain(path)]
    assert children, f"{partial.name} is the base of no shipped recipe"
    for child in children:
        load_config(child)


def base_chain(path: Path) -> list[Path]:
    """The files ``path`` is built on, nearest first (``base:`` followed to the end)."""
    base = (yaml.safe_load(path.read_text()) or {}).get("base")
    if not base:
        return []
    parent = (path.parent / base).resolve()
    return [parent, *base_chain(parent)]


@pytest.mark.parametrize("key,item", schema_fields())
def test_every_field_has_a_help_text(key, item):
    text = item.metadata.get("help")
    assert isinstance(text, str) and text.strip(), f"{key} has no help text"


def test_describe_lists_every_field_with_its_default_and_help_text():
    lines = describe().splitlines()
    defaults = Config()
    for name, _cls in sections():
        assert f"{name}:" in lines
    for key, item in schema_fields():
        section = key.split(".")[0]
        default = getattr(getattr(defaults, section), item.name)
        matching = [line for line in lines if line.strip().startswith(f"{key} = ")]
        assert len(matching) == 1, f"describe() lists {key} {len(matching)} times"
        assert matching[0].endswith(f"  # {item.metadata['help']}")
        if isinstance(default, str):
            assert f'= "{default}"' in matching[0]


def test_describe_reads_the_metadata_not_the_source(monkeypatch):
    from cskd import config as module

    patched = copy.copy(module.DataConfig.__dataclass_fields__["batch_size"])
    patched.metadata = {**patched.metadata, "help": "a help text that lives only in the metadata"}
    fields = {**module.DataConfig.__dataclass_fields__, "batch_size": patched}
    monkeypatch.setattr(module.DataConfig, "__dataclass_fields__", fields)
    assert "data.batch_size = 128  # a help text that lives only in the metadata" in describe()


@pytest.mark.parametrize(
    "override,message",
    [
        ("augment.reprob=1.5", "augment.reprob must lie in [0, 1], got 1.5"),
        ("data.batch_size=0", "data.batch_size must be positive, got 0"),
        ("data.workers=-1", "data.workers must not be negative, got -1"),
        ("optim.lr=-1e-3", "optim.lr must be positive, got -0.001"),
        (
            "distill.schedule=sqrt",
            f"distill.schedule: 'sqrt' is not one of {', '.join(SCHEDULES)}",
        ),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of auto, off, bf16, fp16"),
        (
            "student.inference_rule=best",
            "student.inference_rule: 'best' is not one of auto, cls, cls+dist, cls+dist+patch",
        ),
    ],
)
def test_a_bound_or_choice_violation_names_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value) == message


def outside(bound: str, kind: type) -> object:
    return {"positive": 0, "non_negative": -1, "probability": 1.5}[bound] * (
        1.0 if kind is float else 1
    )


def bounded_fields() -> list[tuple[str, str, type]]:
    hints = {name: typing.get_type_hints(cls) for name, cls in sections()}
    return [
        (key, item.metadata["bound"], hints[key.split(".")[0]][item.name])
        for key, item in schema_fields()
        if item.metadata.get("bound")
    ]


def test_the_schema_declares_bounds_and_choices():
    assert len(bounded_fields()) >= 30
    assert sum(bool(item.metadata.get("choices")) for _, item in schema_fields()) >= 15


@pytest.mark.parametrize("key,bound,kind", bounded_fields())
def test_every_declared_bound_is_enforced(key, bound, kind):
    value = outside(bound, kind)
    with pytest.raises(ConfigError, match=f"^{re.escape(key)} must .*, got "):
        load_config(overrides=[f"{key}={value}"])


@pytest.mark.parametrize(
    "key", [key for key, item in schema_fields() if item.metadata.get("choices")]
)
def test_every_declared_choice_list_is_enforced(key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: 'bogus' is not one of"):
        load_config(overrides=[f"{key}=bogus"])


def test_resolve_returns_a_new_config_and_leaves_its_input_unchanged():
    config = Config()
    config.distill.method = "deit"
    config.train.best_rule = "ema/auto"
    before = copy.deepcopy(config)
    resolved = resolve(config)
    assert resolved is not config
    assert config == before
    assert config.student.inference_rule == "auto"
    assert resolved.student.inference_rule == "cls+dist"
    assert resolved.train.best_rule == "ema/cls+dist"
    assert resolve(resolved) == resolved


def test_resolve_keeps_an_explicit_rule():
    config = Config()
    config.student.inference_rule = "cls"
    config.train.best_rule = "cls+dist"
    resolved = resolve(config)
    assert (resolved.student.inference_rule, resolved.train.best_rule) == ("cls", "cls+dist")


def test_validate_does_not_mutate_and_load_config_resolves():
    config = Config()
    before = copy.deepcopy(config)
    assert validate(config) is config
    assert config == before
    assert config.student.inference_rule == "auto"
    loaded = load_config(overrides=["distill.method=none"])
    assert (loaded.student.inference_rule, loaded.train.best_rule) == ("cls", "cls")


def test_validate_checks_auto_rules_as_they_would_resolve():
    config = Config()
    config.distill.method = "none"
    config.train.best_rule = "cls+dist"
    with pytest.raises(ConfigError, match="train.best_rule=cls\\+dist uses a head"):
        validate(config)


# ------------------------------------------------- recipes read strictly (issue 29, item 7)


def _recipe(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "cycle"),
        ({"a.yaml": "base: a.yaml\n"}, "cycle"),
        ({"a.yaml": "base: [b.yaml]\n"}, "base: must be one file name"),
        ({"a.yaml": "base: 3\n"}, "base: must be one file name"),
        ({"a.yaml": b"optim: {lr: 0.1}\n# caf\xe9\n"}, "not UTF-8"),
        ({"a.yaml": "optim: {lr: 0.1}\noptim: {epochs: 3}\n"}, "duplicate key optim"),
        ({"a.yaml": "optim: {lr: 0.1, lr: 0.2}\n"}, "duplicate key lr"),
        ({"a.yaml": "x: &a [1, 2]\noptim: {epochs: *a}\n"}, "anchors and aliases"),
        ({"a.yaml": "# " + "x" * 2_000_000 + "\n"}, "larger than"),
    ],
    ids=["cycle", "self", "list", "number", "latin1", "dup-section", "dup-key", "alias", "huge"],
)
def test_a_recipe_a_careful_yaml_reader_would_reject_is_one_config_error(tmp_path, files, expected):
    for name, text in files.items():
        _recipe(tmp_path, name, text)
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "a.yaml")


def test_a_billion_laughs_recipe_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    path = _recipe(tmp_path, "a.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(path)


def test_an_override_with_an_alias_or_a_huge_value_is_one_short_line():
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(None, ["optim.epochs=[&a 1, *a]"])
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.epochs=" + "9" * 100_000])
    assert len(str(error.value)) < 1000


def test_an_error_line_quoting_a_huge_value_stays_short(capsys):
    from cskd.cli import main

    assert main(["config", "optim.epochs=[" + "1, " * 200_000 + "1]"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("cskd config: error: optim.epochs") and len(line) < 2200, line[:300]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=-1", "train.seed"),
        ("train.seed=99999999999999999999", "train.seed"),
        ("train.device=gpu", "train.device"),
        ("train.device=cuda:x", "train.device"),
        ("data.num_classes=1000000000000", "data.num_classes"),
    ],
)
def test_values_that_failed_only_after_the_preflight_are_refused_when_the_recipe_loads(
    override, expected
):
    with pytest.raises(ConfigError, match=expected):
        load_config(Path(__file__).parents[1] / "configs/fashion_mnist/cskd.yaml", [override])


def test_an_optimizer_name_timm_does_not_know_is_refused_before_anything_runs(tmp_path, capsys):
    from cskd.cli import main

    recipe = Path(__file__).parents[1] / "configs/fashion_mnist/cskd.yaml"
    run = ["--config", str(recipe), f"train.output_dir={tmp_path / 'run'}", "optim.name=adamww"]
    assert main(["train", *run]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "optim.name adamww" in line and "adamw" in line.split("adamww", 1)[1], line
    assert not (tmp_path / "run").exists()
    assert main(["config", "--config", str(recipe), "optim.name=lookahead_adamw"]) == 0
