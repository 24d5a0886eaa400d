"""The import rules the architecture section of the README states, checked on the source (every import, including
the ones inside functions): no import cycle in ``compress/``, no module importing another's private names, and
tasks and pruners never importing each other (what they share lives outside both)."""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compress"


def _modules() -> Dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> List[Tuple[str, str]]:
    """(module imported, name taken from it or '') for every import statement of ``name``'s file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(base, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
    return found


def _edges() -> Dict[str, Set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for base, taken in _imports(name, path):
            target = f"{base}.{taken}" if f"{base}.{taken}" in MODULES else base
            if target in MODULES and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def _cycle(edges: Dict[str, Set[str]]):
    """One import cycle, as a list of modules, or None."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_checker_sees_the_package():
    assert {"compress.run", "compress.stages", "compress.tokens", "compress.pruners.base"} <= set(MODULES)
    assert "compress.stages" in _edges()["compress.run"]


def test_no_import_cycle():
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()))


def test_no_private_names_across_modules():
    bad = [(name, base, taken) for name, path in MODULES.items() for base, taken in _imports(name, path)
           if base.startswith("compress") and base != name and taken.startswith("_") and not taken.startswith("__")]
    assert not bad


@pytest.mark.parametrize("a, b", [("compress.tasks", "compress.pruners"), ("compress.pruners", "compress.tasks")])
def test_tasks_and_pruners_do_not_import_each_other(a, b):
    edges = _edges()
    bad = {m: sorted(t for t in edges[m] if t == b or t.startswith(b + ".")) for m in edges if m == a or m.startswith(a + ".")}
    assert not {m: t for m, t in bad.items() if t}


def test_pruners_act_in_training_only_through_the_lifecycle():
    """No pruner imports Lightning: the runner's one callback (``compress.lifecycle``) calls their hooks."""
    bad = {name: base for name, path in MODULES.items() if name.startswith("compress.pruners")
           for base, _ in _imports(name, path) if base.split(".")[0] == "lightning"}
    assert not bad


def _class_members(module_prefix: str) -> Set[str]:
    names = set()
    for name, path in MODULES.items():
        if name == module_prefix or name.startswith(module_prefix + "."):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    names |= {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_shared_code_never_probes_a_pruner_specific_name():
    """``hasattr``/``getattr`` with a method name that only some pruner defines (not the ``Pruner`` protocol)
    is a pruner-specific branch; the runner, report, commands and tasks must not have one."""
    protocol = _class_members("compress.pruners.base")
    specific = _class_members("compress.pruners") - protocol - {"__init__", "forward"}
    shared = [n for n in MODULES if n.startswith("compress.tasks") or n in {
        "compress.run", "compress.stages", "compress.rundir", "compress.preflight", "compress.context",
        "compress.report", "compress.commands", "compress.export", "compress.lifecycle"}]
    bad = []
    for name in shared:
        for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in specific):
                bad.append((name, node.args[1].value))
    assert not bad
