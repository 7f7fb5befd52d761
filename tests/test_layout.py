"""The package's layout keeps its arrows pointing down: the method is pure, infrastructure holds
no method code, nothing imports back up, and the light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "cskd"
# a layer may import itself and anything to its right, never to its left
ORDER = "cli commands training teacher data config method models infra errors".split()


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "cskd"


def imports(path: Path) -> set[str]:
    """The cskd modules ``path`` imports (top-level and inside functions), as dotted names."""
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module is None:
                found |= {".".join([*base, alias.name]) for alias in node.names}
            else:
                found.add(".".join([*base, node.module]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cskd"):
            found.add(node.module)
    return found


def test_every_import_points_down_the_layers():
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = []
    for path in SOURCE.rglob("*.py"):
        here = layer(".".join(path.relative_to(SOURCE.parent).with_suffix("").parts))
        if here not in rank:  # cskd/__init__.py (lazy public API) and __main__.py
            continue
        for target in imports(path):
            there = layer(target)
            if there in rank and rank[there] < rank[here]:
                wrong.append(f"{path.relative_to(SOURCE)} imports {target}")
    # method and infrastructure are siblings below config: neither imports the other
    for path in (SOURCE / "method").rglob("*.py"):
        wrong += [f"{path.name} imports {t}" for t in imports(path) if layer(t) == "infra"]
    # the library's timm models are timm's kind of file: they import nothing of cskd
    for path in (SOURCE / "models").rglob("*.py"):
        wrong += [f"models/{path.name} imports {t}" for t in imports(path) if layer(t) != "models"]
    assert not wrong, wrong


def test_the_light_modules_do_not_load_the_library():
    code = (
        "import sys, cskd.errors, cskd.infra.distributed, cskd; "
        "print(sorted(m for m in ('timm', 'cskd.config', 'cskd.training.run') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_public_api_names_resolve():
    import cskd

    for name in cskd.__all__:
        assert getattr(cskd, name) is not None, name
    assert cskd.train.__module__ == "cskd.training.run"


def test_every_user_error_and_command_is_public():
    """A new error class or command cannot be forgotten in ``cskd/__init__.py:_HOMES``, nor an
    error class in ``errors.USER_ERRORS`` (the one line and exit status 2)."""
    import cskd
    import cskd.errors

    errors = [
        value
        for value in vars(cskd.errors).values()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == "cskd.errors"
    ]
    assert all(issubclass(error, cskd.errors.USER_ERRORS) for error in errors), errors
    missing = [error.__name__ for error in errors if error.__name__ not in cskd.__all__]
    commands = {"evaluate_checkpoint", "build_cache", "diagnose_run", "run_demo", "train"}
    assert not missing and commands <= set(cskd.__all__), missing
