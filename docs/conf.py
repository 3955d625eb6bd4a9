"""Sphinx configuration of jaxembed's documentation site.

Build it with ``python -m sphinx -W --keep-going -n -b html docs docs/_build/html`` (the command
in the README's Development section, and what CI runs): every warning fails the build, and ``-n``
(nitpicky) makes a cross-reference that resolves to nothing a warning.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's jaxembed, also without an install
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import jaxembed  # noqa: E402

project = "jaxembed"
author = "the jaxembed authors"
copyright = "2026, the jaxembed authors"
release = version = jaxembed.__version__

extensions = [
    "myst_parser",  # the pages are Markdown (MyST), as the README is
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # the docstrings are Google style
    "sphinx.ext.viewcode",
    "aliases",  # docs/_ext/aliases.py: a reference by any public name of an object
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links, as on GitHub
myst_enable_extensions = ["colon_fence"]

# the reference shows each signature as help() does, with its annotations
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields of their class, not a second entry beside autodoc's
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"jaxembed {release}"
html_static_path = ["_static"]

# cross-references into libraries outside this site (no intersphinx: the build runs offline).
# A reference to jaxembed itself that resolves to nothing still fails the build.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|numpy|np|flax|nnx|optax|typing|collections|enum|torch|chex)(\..*)?"),
    (r"py:.*", r"pathlib(\..*)?"),
    (r"py:class", r"(Array|ArrayLike|DTypeLike|PRNGKeyArray|Mesh|NamedSharding|PartitionSpec)"),
    (r"py:class", r"(Callable|Sequence|Mapping|Iterable|Iterator|Any|Literal|NamedTuple)"),
    (r"py:class", r"(optional|callable|array|pytree|ndarray|dtype|Path|PathLike|os\..*)"),
    # Sphinx cannot parse a property's ``tuple[str, ...]`` annotation into a target
    (r"py:class", r"tuple\[.*"),
]

# jax.typing.ArrayLike is a union; autodoc would print its eight members in every signature
# (``autodoc_type_aliases`` cannot name it inside ``Mapping[str, ArrayLike]``)
_ARRAY_LIKE = (
    "~jax.jaxlib._jax.Array | ~numpy.ndarray | ~numpy.bool | ~numpy.number | bool | int | float | "
    "complex"
)


def _array_like(app, what, name, obj, options, signature, return_annotation):
    if signature is not None:
        signature = signature.replace(_ARRAY_LIKE, "~jax.typing.ArrayLike")
    if return_annotation is not None:
        return_annotation = return_annotation.replace(_ARRAY_LIKE, "~jax.typing.ArrayLike")
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _array_like)
