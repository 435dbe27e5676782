"""The package's layering, read from the source alone (AST; nothing is imported or run).

Dependencies point one way: entry points (main, evaluate, visualize, bench) -> tasks ->
{train, eval, models, losses, data, interop} -> {parallel, checkpoint, metrics, errors}. Every
`import` counts, including those inside functions (a lazy import is still a dependency).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmjax"
MAX_LINES = 400

# Import cycles that are allowed, each with the reason. Empty: there is none.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute name `path` imports: `import a.b` gives a.b; `from a import b` gives a.b
    when that is a module, else a (b is a name defined in a)."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    return names


def _resolve(name: str) -> str | None:
    """The mmjax module a dotted name lands in (a module, or the module holding the name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    """module -> the mmjax modules it imports. Importing a.b.c also runs the `__init__` of a.b
    (unless the importer is inside a.b already, whose package is initialised first)."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for name in _imported_names(path):
            target = _resolve(name) if name.split(".")[0] == "mmjax" else None
            if target is None or target == module:
                continue
            targets.add(target)
            own = set(_ancestors(module))
            targets.update(a for a in _ancestors(target) if a not in own and a in MODULES)
        graph[module] = targets - {module}
    return graph


GRAPH = _graph()


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_graph_is_read():
    assert len(MODULES) > 50
    assert "mmjax.train.task" in GRAPH["mmjax.train.loop"]
    assert "mmjax.data.sources" in GRAPH["mmjax.data.pipeline"]
    # An import inside a function counts (sources builds shapes lazily), and so does the
    # package `__init__` an import runs.
    assert "mmjax.data.builtin.shapes_builder" in GRAPH["mmjax.data.sources"]
    assert {"mmjax.train", "mmjax.train.task"} <= GRAPH["mmjax.tasks.classification"]


def test_no_module_imports_the_repository_configs():
    offenders = sorted(
        module
        for module, path in MODULES.items()
        if any(name.split(".")[0] == "configs" for name in _imported_names(path))
    )
    assert offenders == [], "the package must not import the top-level configs/ folder"


def test_the_trainer_imports_no_task_and_no_model():
    offenders = {
        module: sorted(t for t in targets if t.startswith(("mmjax.tasks", "mmjax.models")))
        for module, targets in GRAPH.items()
        if module.startswith("mmjax.train")
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_errors_is_a_leaf():
    assert GRAPH["mmjax.errors"] == set()


def test_no_import_cycles():
    cycles = [c for c in _strongly_connected(GRAPH) if frozenset(c) not in ALLOWED_CYCLES]
    assert cycles == [], f"import cycles (allow one only in ALLOWED_CYCLES, with why): {cycles}"


def test_tarjan_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(graph) == [{"a", "b", "c"}]


def test_files_stay_short():
    lengths = {m: p.read_text(encoding="utf-8").count("\n") for m, p in MODULES.items()}
    assert {m: n for m, n in lengths.items() if n > MAX_LINES} == {}, f"at most {MAX_LINES}"
