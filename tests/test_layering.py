"""The kit's modules import each other one way: no circles, and the locked harness never imports tools.

Every import statement of the harness (prepare.py, dataset_builders.py, backends/) and of tools/ counts,
also one inside a function: a circle through a late import still means neither module can be
read without the other. Importing `backends.x` from outside the package also runs
`backends/__init__.py`, so it counts as an import of the package as well (from inside, the
package is already being imported).
"""

import ast

from conftest import REPO_ROOT

HARNESS = ("prepare", "dataset_builders", "backends")


def kit_modules(root):
    """{module name: path} of the harness and the tools."""
    modules = {}
    for name in ("prepare", "dataset_builders"):
        if (root / f"{name}.py").exists():
            modules[name] = root / f"{name}.py"
    for package in ("backends", "tools"):
        for path in sorted((root / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name, path, modules):
    """The kit modules one file imports (each other package whose __init__ the import runs, too)."""
    found, own_package = set(), name.split(".")[0] if "." in name else None

    def add(imported):
        parts = imported.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in modules and not (end < len(parts) and prefix == own_package):
                found.add(prefix)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                add(submodule if submodule in modules else node.module)
    return found


def import_graph(root=REPO_ROOT):
    modules = kit_modules(root)
    return {name: imported_modules(name, path, modules) - {name} for name, path in modules.items()}


def find_circle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name)
            if circle:
                return circle
    return None


def test_the_scan_finds_a_circle_through_a_late_import(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "a.py").write_text("from tools import b\n")
    (tmp_path / "tools" / "b.py").write_text("def f():\n    from tools.a import g\n")
    (tmp_path / "tools" / "c.py").write_text("import tools.b\n")
    circle = find_circle(import_graph(tmp_path))
    assert circle in (["tools.a", "tools.b", "tools.a"], ["tools.b", "tools.a", "tools.b"])


def test_the_kit_has_no_import_circle():
    graph = import_graph()
    assert {"prepare", "dataset_builders", "backends", "backends.report", "tools.experiment", "tools.cluster"} <= set(graph)
    assert find_circle(graph) is None


def test_the_locked_harness_never_imports_the_tools():
    for name, targets in import_graph().items():
        if name.split(".")[0] in HARNESS:
            assert not {t for t in targets if t.split(".")[0] == "tools"}, f"{name} imports the tools"


def test_no_module_of_the_kit_edits_the_import_path():
    for path in kit_modules(REPO_ROOT).values():
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path
        assert "noqa: E402" not in text, path
