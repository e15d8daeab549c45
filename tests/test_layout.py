"""The package's layering (DESIGN.md section 7): the op layer never imports the transformers integration (hf/),
and no two modules import each other, directly or through others (module-level imports; imports inside functions
are deferred on purpose and are not edges)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "molora_ops"
OP_LAYER = ("ops", "reference", "plan", "runtime", "_validation", "impl")
ABOVE_THE_OP_LAYER = ("hf", "benchmarking", "demo", "commands", "cli", "vllm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _top_level_imports(path: Path) -> set[str]:
    """molora_ops modules imported at module level by the file at `path` (names that are submodules count)."""
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            else:
                target = node.module or ""
            if target.startswith("molora_ops"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("molora_ops"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {t for t in _top_level_imports(path) if t in files and t != name}
    return graph


def test_the_op_layer_never_imports_the_integration():
    graph = _graph()
    for name, deps in graph.items():
        layer = name.split(".")[1] if "." in name else ""
        if layer in OP_LAYER:
            upward = sorted(d for d in deps if d != "molora_ops" and d.split(".")[1] in ABOVE_THE_OP_LAYER)
            assert not upward, f"{name} (op layer) imports {upward}"


def test_no_import_cycles():
    graph = _graph()
    graph.pop("molora_ops", None)  # the package __init__ re-exports from its submodules by design
    for deps in graph.values():
        deps.discard("molora_ops")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check can fail: two modules that import each other are reported."""
    pkg = tmp_path / "molora_ops"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nthing = 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "molora_ops.sub.a -> molora_ops.sub.b -> molora_ops.sub.a" in str(exc)
    else:
        raise AssertionError("the cycle was not reported")


def test_every_subpackage_is_packaged():
    """pyproject.toml lists every package folder (a wheel or a non-editable install leaves out what it does not)."""
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, f"not in pyproject.toml's packages: {sorted(on_disk - listed)}"
