"""The structure DESIGN.md promises, read from the source: imports go one way (no module imports one that
imports it back, no function-local imports of project modules to dodge a cycle), the diffusion math never
imports Lightning, the model never imports the diffusion math, and the entry scripts stay thin."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("train.py", "evaluate.py", "sample.py", "convert.py")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path = REPO, packages: tuple[str, ...] = ("src",)) -> dict[str, Path]:
    files = {module_name(p, root): p for package in packages for p in (root / package).rglob("*.py")}
    files.update({Path(name).stem: root / name for name in ENTRY_SCRIPTS if (root / name).is_file()})
    return files


def with_packages(target: str, importer_package: str, known: set[str]) -> list[str]:
    """`target` and the packages above it whose __init__ the import runs: every parent package of the target
    except the importer's own package and its parents (those are initialised before the importer runs)."""
    parts = target.split(".")
    running = set()
    for k in range(1, len(parts)):
        parent = ".".join(parts[:k])
        if parent in known and not (importer_package == parent or importer_package.startswith(parent + ".")):
            running.add(parent)
    return [*sorted(running), target]


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(project module imported, whether the import sits inside a function) for every import in the file.
    `from package import name` counts as importing the package (its __init__ runs) and, where `name` is a
    submodule, that submodule; `import a.b.c` / `from a.b.c import x` also run the __init__ of a and a.b."""
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
            for module in with_packages(target, package, known) if target in known else ():
                if module != name:
                    found.append((module, id(node) in local))
    return found


def import_graph(root: Path = REPO, packages: tuple[str, ...] = ("src",)) -> tuple[dict[str, set[str]], list[str]]:
    files = project_files(root, packages)
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
    assert "src.builders" in graph["src.training"] and "src.checkpoints" in graph["src.sampling.loading"]


def test_the_graph_walker_sees_a_cycle_through_a_package_init(tmp_path):
    """pkg_a.x -> pkg_b.y -> pkg_a.w has no cycle among the modules themselves, but importing pkg_a.w runs
    pkg_a/__init__, which imports pkg_a.x: Python meets a half-initialised module there."""
    files = {
        "pkg_a/__init__.py": "from .x import X\n",
        "pkg_a/x.py": "from pkg_b.y import Y\nX = Y\n",
        "pkg_a/w.py": "W = 1\n",
        "pkg_b/__init__.py": "",
        "pkg_b/y.py": "from pkg_a.w import W\nY = W\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph, _ = import_graph(tmp_path, ("pkg_a", "pkg_b"))
    assert "pkg_a" in graph["pkg_b.y"]  # the __init__ that `from pkg_a.w import W` runs
    assert find_cycle(graph) is not None
    # A sibling import inside a package does not re-run that package's own __init__.
    assert "pkg_a" not in graph["pkg_a.x"]
    (tmp_path / "pkg_b" / "y.py").write_text("Y = 1\n")
    assert find_cycle(import_graph(tmp_path, ("pkg_a", "pkg_b"))[0]) is None


def test_no_import_cycles_and_no_function_local_project_imports():
    graph, local_imports = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert not local_imports, f"function-local imports of project modules: {local_imports}"


# The packages and top-level modules of src/, lowest first: each imports only from lower layers, never from its
# own layer's other units or above (the diffusion math and the networks know nothing of Lightning or each other;
# metrics know nothing of sampling; evaluation, conversion and training sit on top).
LAYERS = (
    ("src.errors", "src.atomic", "src.provenance", "src.config_diff"),
    ("src.diffusion", "src.models"),
    ("src.data",),
    ("src.lit",),
    ("src.builders",),
    ("src.formats", "src.loggers", "src.metrics"),
    ("src.checkpoints",),
    ("src.sampling",),
    ("src.callbacks",),
    ("src.evaluation", "src.conversion", "src.training", "src.cli"),
)


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_unit_of_src_has_a_layer():
    layered = {unit for layer in LAYERS for unit in layer}
    units = {unit_of(m) for m in import_graph()[0] if m.startswith("src.")}
    assert units == layered, f"not in LAYERS: {sorted(units - layered)}; gone: {sorted(layered - units)}"


def test_layers_import_downwards_only():
    level = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    graph, _ = import_graph()
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith("src.")
        for target in targets
        if target.startswith("src.")
        and unit_of(target) != unit_of(name)
        and level[unit_of(target)] >= level[unit_of(name)]
    )
    assert not upward, f"imports that do not go down a layer: {upward}"


def test_the_diffusion_math_never_imports_lightning():
    for path in (REPO / "src" / "diffusion").rglob("*.py"):
        assert "lightning" not in path.read_text(), path


def test_entry_scripts_are_thin():
    for name in ENTRY_SCRIPTS:
        if (REPO / name).is_file():
            assert len((REPO / name).read_text().splitlines()) <= 60, name
