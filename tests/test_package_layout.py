"""The package's import graph, read from the source (nothing is imported): no module uses a
`_private` name of another module, and no two modules import each other (directly or around a
longer loop), function-level imports included.

A private name is one with a single leading underscore; a private *module* (`_versions`) may be
imported within the package (its names are then public to the package).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "deformable_detr_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# (file relative to the repository, "alias._name") pairs still allowed, each with its reason.
# The check fails when an entry is no longer needed, so the list only shrinks.
KNOWN_PRIVATE_USES: set[tuple[str, str]] = set()


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {_module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def _source_of(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: pathlib.Path) -> list[tuple[str, str]]:
    """(file, what) for each `from pkg.x import _y` and `x._y` on an imported package module,
    where `_y` is not itself a module of the package."""
    modules = _modules(root)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        where = str(path.relative_to(root.parent))
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _source_of(module, path, node)
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if _is_private(alias.name) and target not in modules:
                        found.append((where, f"from {source} import {alias.name}"))
                    if target in modules:
                        bound[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and f"{bound[node.value.id]}.{node.attr}" not in modules
            ):
                found.append((where, f"{node.value.id}.{node.attr}"))
    return sorted(set(found))


def import_cycles(root: pathlib.Path) -> list[list[str]]:
    """Strongly connected groups (of two or more modules) of the package's import graph."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {module: set() for module in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                source = _source_of(module, path, node)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    edges[module].add(target if target in modules else source)
            elif isinstance(node, ast.Import):
                edges[module].update(alias.name for alias in node.names)
        edges[module] = {target for target in edges[module] if target in modules} - {module}
    return _strongly_connected(edges)


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; groups of one are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, successors = work[-1]
            child = next((s for s in successors if s not in index or s in stack), None)
            if child is not None and child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                work.append((child, iter(sorted(edges[child]))))
                continue
            if child is not None:
                low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def test_no_private_name_is_used_across_modules():
    found = set(private_uses(ROOT))
    new = sorted(found - KNOWN_PRIVATE_USES)
    stale = sorted(KNOWN_PRIVATE_USES - found)
    assert not new, (
        f"private names used across modules: {new}; give each a public name in the module "
        "that owns it (or move it there)"
    )
    assert not stale, f"remove these entries from KNOWN_PRIVATE_USES, no longer used: {stale}"


def test_no_import_cycle():
    cycles = import_cycles(ROOT)
    assert not cycles, f"modules that import each other: {cycles}; move what both need"


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "from deformable_detr_jax.a import _hidden\n",
            "from deformable_detr_jax.a import _hidden",
        ),
        ("from .a import _hidden\n", "from deformable_detr_jax.sub.a import _hidden"),
        ("from deformable_detr_jax.sub import a as m\nm._hidden()\n", "m._hidden"),
        ("import deformable_detr_jax.sub.a as m\nx = m._hidden\n", "m._hidden"),
    ],
)
def test_the_private_check_finds_each_form(tmp_path, source, expected):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "_hidden = 1\n",
            "sub/__init__.py": "",
            "sub/a.py": "def _hidden(): ...\n",
            "sub/b.py": source,
            "sub/_private_module.py": "",
            "c.py": "from deformable_detr_jax.sub import _private_module\nx = obj._y\n",
        },
    )
    assert private_uses(root) == [(f"{PACKAGE}/sub/b.py", expected)]


def test_the_cycle_check_finds_a_loop_through_a_function_level_import(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from deformable_detr_jax.b import f\n",
            "b.py": "def f():\n    from deformable_detr_jax.c import g\n",
            "c.py": "import deformable_detr_jax.a\n",
            "d.py": "from deformable_detr_jax import a\n",
        },
    )
    assert import_cycles(root) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c"]]


COMMANDS = (
    "cli/train.py",
    "cli/predict.py",
    "cli/demo.py",
    "convert/__main__.py",
    "export/__main__.py",
    "training/to_pretrained.py",
)


def _docstring(relative: str) -> str:
    return ast.get_docstring(ast.parse((ROOT / relative).read_text())) or ""


def test_exit_statuses_are_written_down_once_in_exits():
    tree = ast.parse((ROOT / "cli/exits.py").read_text())
    codes = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper()
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, int)
    }
    assert {"OK", "BAD_INPUT", "INTERNAL", "INTERRUPTED"} <= set(codes)
    rows = {
        int(line.split()[0])
        for line in _docstring("cli/exits.py").splitlines()
        if line[:1] == " " and line.split()[:1] and line.split()[0].isdigit()
    }
    assert rows == set(codes.values()), "every status constant has its row in the table, no more"
    for relative in COMMANDS:
        text = _docstring(relative)
        repeated = [code for code in (3, 4, 5, 70, 130) if f" {code} " in f" {text} "]
        assert not repeated, f"{relative} lists exit statuses {repeated}; point to cli/exits.py"
