"""The package's shape: no import cycles, each folder imports only what its docstring allows."""

import ast
import pathlib
import subprocess
import sys

import pytest

import jaxembed

ROOT = pathlib.Path(jaxembed.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The jaxembed modules ``name`` imports anywhere (inside functions too).

    ``from pkg import sub`` counts as an import of the submodule ``pkg.sub`` only, as Python runs
    it; ``from pkg import value`` as one of ``pkg``.
    """
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_in_a_circle():
    assert _cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {**GRAPH, "jaxembed.core._options": GRAPH["jaxembed.core._options"] | {"jaxembed"}}
    assert any("jaxembed" in c and "jaxembed.core._options" in c for c in _cycles(graph))


# what each folder may import, as its __init__ docstring says (the layers, bottom up)
ALLOWED = {
    "jaxembed.kernels": ("jaxembed.kernels",),
    "jaxembed.core": ("jaxembed.kernels", "jaxembed.core"),
    "jaxembed.sparse": ("jaxembed.kernels", "jaxembed.core", "jaxembed.sparse"),
    "jaxembed.sharding": (
        "jaxembed.kernels",
        "jaxembed.core",
        "jaxembed.sparse",
        "jaxembed.collections",
        "jaxembed.sharding",
    ),
    "jaxembed.collections": ("jaxembed.core", "jaxembed.sparse", "jaxembed.collections"),
    "jaxembed.collisions": (
        "jaxembed.kernels",
        "jaxembed.core",
        "jaxembed.sparse",
        "jaxembed.collections",
        "jaxembed.sharding",
        "jaxembed.collisions",
    ),
    "jaxembed.modules": (
        "jaxembed.core",
        "jaxembed.sparse",
        "jaxembed.sharding",
        "jaxembed.collections",
        "jaxembed.collisions",
        "jaxembed._interop",
        "jaxembed.quantized",
        "jaxembed.modules",
    ),
    "jaxembed._interop": ("jaxembed.core",),
    "jaxembed.quantized": ("jaxembed.core", "jaxembed.quantized"),
    "jaxembed.linen": ("jaxembed.modules",),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_the_layers_below(folder):
    wrong = {
        (name, dep)
        for name, deps in GRAPH.items()
        if _within(name, folder)
        for dep in deps
        if not any(_within(dep, allowed) for allowed in ALLOWED[folder])
    }
    assert wrong == set()


@pytest.mark.parametrize(
    "folder",
    [
        "kernels",
        "core",
        "sparse",
        "sharding",
        "collections",
        "collisions",
        "quantized",
        "modules",
        "serving",
        "checkpoint",
        "bench",
    ],
)
def test_each_folder_says_what_it_owns(folder):
    doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text()))
    assert doc
    if folder != "bench":
        assert "may import" in doc


def test_the_core_and_the_sparse_update_know_nothing_of_meshes():
    # they run against the Layout interface; shard_map, specs and collectives live in
    # jaxembed.sharding. The one exception is row_mean's explicit column_axis (a user's own
    # row-wise optimizer needs it, where a thread-local would hide it).
    words = ("shard_map", "PartitionSpec", "NamedSharding", "psum", "pmax", "axis_index", "mesh")
    allowed = {("jaxembed.sparse._update", "psum")}
    found = {
        (name, word)
        for name, path in MODULES.items()
        if _within(name, "jaxembed.core") or _within(name, "jaxembed.sparse")
        for word in words
        if any(word in line for line in _code_lines(path))
    }
    assert found == allowed


def _code_lines(path: pathlib.Path) -> list[str]:
    """The lines of ``path`` outside docstrings and comments."""
    tree = ast.parse(path.read_text())
    doc_lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc_lines |= set(range(value.lineno, value.end_lineno + 1))
    return [
        line.split("#")[0]
        for k, line in enumerate(path.read_text().splitlines(), 1)
        if k not in doc_lines
    ]


def test_linen_and_bench_are_reached_from_the_package():
    code = (
        "import sys, jaxembed\n"
        "assert 'jaxembed.linen' not in sys.modules\n"
        "assert 'jaxembed.serving' not in sys.modules\n"
        "assert 'jaxembed.checkpoint' not in sys.modules\n"
        "print(jaxembed.linen.Embedding.__name__, jaxembed.bench.main.__name__,\n"
        "      jaxembed.serving.export.__name__, jaxembed.checkpoint.save.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["Embedding", "main", "export", "save"]
