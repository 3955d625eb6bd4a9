"""The documentation site: every page's Python blocks run, and every public name is in the API
reference with a docstring. (CI builds the site itself with warnings as errors.)"""

import importlib
import inspect
import pathlib
import re
import textwrap

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
PUBLIC = [
    "jaxembed",
    "jaxembed.core",
    "jaxembed.sparse",
    "jaxembed.collections",
    "jaxembed.collisions",
    "jaxembed.sharding",
    "jaxembed.quantized",
    "jaxembed.modules",
    "jaxembed.linen",
    "jaxembed.kernels",
    "jaxembed.serving",
    "jaxembed.checkpoint",
    "jaxembed.bench",
]


def python_blocks(path: pathlib.Path) -> list[str]:
    return [
        textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    ]


def test_every_page_is_found():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "getting-started.md", "api/index.md", "guides/sparse-training.md"} <= names


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if python_blocks(p)],
    ids=lambda p: p.relative_to(DOCS).as_posix(),
)
def test_page_blocks_run_in_order(page):
    namespace: dict = {}
    for block in python_blocks(page):
        try:
            exec(compile(block, str(page), "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message says which block failed
            pytest.fail(f"{page.name}: block failed: {e!r}\n{block}")


def _documented() -> set[int]:
    """id() of every object an API or design page documents (autodoc and ``data`` entries)."""
    found = set()
    for page in PAGES:
        for name in re.findall(
            r"^\.\. (?:auto)?(?:function|class|data|module):: ([\w.]+)", page.read_text(), re.M
        ):
            module, _, attr = name.rpartition(".")
            try:
                obj = importlib.import_module(name)
            except ImportError:
                obj = getattr(importlib.import_module(module), attr)
            found.add(id(obj))
    return found


def _public() -> list[tuple[str, object]]:
    names = []
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        names += [(f"{module_name}.{n}", getattr(module, n)) for n in module.__all__]
    return names


def test_every_public_name_has_a_reference_entry():
    documented = _documented()
    missing = [name for name, obj in _public() if id(obj) not in documented]
    assert not missing, f"public names with no entry in docs/api: {missing}"


def test_every_public_name_has_a_docstring():
    bare = [
        name
        for name, obj in _public()
        if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj))
        and not (inspect.getdoc(obj) or "").strip()
    ]
    assert not bare, f"public names without a docstring: {bare}"


def test_every_page_is_in_a_toctree():
    listed = set()
    for page in PAGES:
        for block in re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith(":"):
                    base = (page.parent / line).relative_to(DOCS)
                    listed.add(base.as_posix() + ".md")
    orphans = {p.relative_to(DOCS).as_posix() for p in PAGES} - listed - {"index.md"}
    assert not orphans, f"pages no toctree lists: {sorted(orphans)}"
