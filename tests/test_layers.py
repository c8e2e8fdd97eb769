"""The module map of the README's development section, checked: no import cycles among credex's
modules (imports inside functions count too: they only hide a cycle), and each package imports
only the layers below it. Every module also imports on its own, first, with no other credex module loaded."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "credex"

# What each part may import of credex (besides itself). The foundation (errors, retry, output,
# config, metrics, db) is below everything that does the work; commands and cli are on top.
FOUNDATION = {
    "credex",
    "credex.errors",
    "credex.retry",
    "credex.output",
    "credex.config",
    "credex.db",
    "credex.metrics",
}
MAY_IMPORT = {
    "credex.db": {"credex", "credex.errors", "credex.db", "credex.retry", "credex.config"},
    "credex.amqp": {"credex", "credex.errors", "credex.amqp"},
    # `track REDEMPTION_ID` joins a redemption to its carrier: the one place logistics reads points.
    "credex.logistics.tracking": {"credex", "credex.errors", "credex.logistics", "credex.points.redemptions"},
    "credex.logistics": {"credex", "credex.errors", "credex.retry", "credex.logistics", "credex.output"},
    "credex.points": FOUNDATION | {"credex.points", "credex.relay.topology"},  # the messages' names
    "credex.relay": FOUNDATION | {"credex.relay", "credex.amqp", "credex.worker", "credex.points"},
    "credex.warehouse": FOUNDATION
    | {"credex.warehouse", "credex.amqp", "credex.worker", "credex.logistics", "credex.relay.topology"},
    "credex.audit": FOUNDATION,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py") if "migrations" not in path.parts}


def imports_of(path: Path, name: str) -> set[str]:
    """credex modules ``path`` imports, at the top or inside a function (TYPE_CHECKING-only ones
    left out: they never run)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for child in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("credex"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("credex"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    known = modules()
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in modules().items()}


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for name, imported in graph().items():
        rule = next(
            (
                allowed
                for layer, allowed in MAY_IMPORT.items()
                if name == layer or name.startswith(layer + ".")
            ),
            None,
        )
        if rule is None:
            continue
        for module in imported:
            if not any(module == allowed or module.startswith(allowed + ".") for allowed in rule):
                wrong.append(f"{name} imports {module}")
    assert wrong == [], "\n".join(sorted(wrong))


# Each module imported first, with no credex module loaded: a cycle hidden by the import order
# of the others shows up as an ImportError. One interpreter for all of them (the third-party
# packages stay loaded; credex's own, and the packages that keep registries of what credex
# defines, are dropped before each import): a fresh interpreter per module cost a second each.
IMPORT_EACH = """
import importlib, json, sys, traceback
FRESH = ("credex", "sqlmodel", "prometheus_client")
failed = {}
for name in sys.argv[1:]:
    for loaded in [module for module in sys.modules if module.split(".")[0] in FRESH]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc()
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own() -> None:
    names = sorted(set(modules()) - {"credex.__main__"})  # that one runs the CLI
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout)
    assert failed == {}, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
    assert len(names) > 50  # every module, not a list that came out empty
