"""The structure DESIGN.md promises, read from the source: imports go one way (no module imports one that
imports it back, no function-local imports of project modules to dodge a cycle), the diffusion math never
imports Lightning, the model never imports the diffusion math, and the entry scripts stay thin."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("train.py", "evaluate.py", "sample.py", "convert.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    files = {module_name(p): p for p in (REPO / "src").rglob("*.py")}
    files.update({Path(name).stem: REPO / name for name in ENTRY_SCRIPTS if (REPO / name).is_file()})
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(project module imported, whether the import sits inside a function) for every import in the file.
    `from package import name` counts as importing the package (its __init__ runs) and, where `name` is a
    submodule, that submodule."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    # `if TYPE_CHECKING:` imports never run: annotations only
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.append((target, id(node) in local))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    files = project_files()
    known = set(files)
    graph, local_imports = {}, []
    for name, path in files.items():
        edges = imported_modules(name, path, known)
        graph[name] = {target for target, _ in edges}
        local_imports += [f"{name} -> {target}" for target, inside in edges if inside]
    return graph, local_imports


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    graph, _ = import_graph()
    assert "src.builders" in graph["src.training"] and "src.checkpoints" in graph["src.evaluation.context"]


def test_no_import_cycles_and_no_function_local_project_imports():
    graph, local_imports = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert not local_imports, f"function-local imports of project modules: {local_imports}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("src.diffusion", ("src.lit", "src.models", "src.data", "src.training", "src.evaluation", "src.callbacks")),
        ("src.models", ("src.diffusion", "src.lit", "src.training", "src.evaluation")),
        ("src.lit", ("src.training", "src.evaluation", "src.builders", "src.checkpoints")),
    ],
)
def test_layers_import_downwards_only(package, forbidden):
    graph, _ = import_graph()
    for name in (n for n in graph if n == package or n.startswith(package + ".")):
        bad = sorted(m for m in reachable(graph, name) if m.startswith(forbidden))
        assert not bad, f"{name} reaches {bad}"


def test_the_diffusion_math_never_imports_lightning():
    for path in (REPO / "src" / "diffusion").rglob("*.py"):
        assert "lightning" not in path.read_text(), path


def test_entry_scripts_are_thin():
    for name in ENTRY_SCRIPTS:
        if (REPO / name).is_file():
            assert len((REPO / name).read_text().splitlines()) <= 60, name
