"""Cross-references to a public object by any of its names.

jaxembed documents each object once, under the name users call it by (``jaxembed.embedding``),
but the same object is public under other names too (``jaxembed.core.embedding``), and a
docstring refers to its neighbours by the short names of its own subpackage
(``:func:`embedding_bag_collection``` in :mod:`jaxembed.collections`). When Sphinx finds no entry
for a Python reference, this resolves the name to the object it denotes (by import) and links
the entry that documents that same object. A name that denotes no documented object stays
unresolved, and the nitpicky build (``-n -W``) fails on it.
"""

from __future__ import annotations

import importlib


def _lookup(path: str):
    """The object ``path`` names (``pkg.mod.Class.attr``), or ``None``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = (
                    obj.__dict__[attr]
                    if isinstance(obj, type) and attr in obj.__dict__
                    else (getattr(obj, attr))
                )
        except AttributeError:
            return None
        return obj
    return None


def _documented(env) -> dict[int, str]:
    """id(object) -> the name of the entry documenting it."""
    cache = getattr(env, "_jaxembed_documented", None)
    if cache is None or cache[0] != len(env.domains["py"].objects):
        by_id = {}
        for name in env.domains["py"].objects:
            obj = _lookup(name)
            if obj is not None and not isinstance(obj, (str, int, float, tuple)):
                by_id.setdefault(id(obj), name)
        cache = (len(env.domains["py"].objects), by_id)
        env._jaxembed_documented = cache
    return cache[1]


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates.append(f"{module}.{target}")
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
    # a docstring's names are relative to where it is written: its object, the object's class,
    # its module, and the public package over that module
    source = node.source or (node.parent.source if node.parent is not None else None) or ""
    if "docstring of " in source:
        where = source.rsplit("docstring of ", 1)[1].split(":")[0]
        parts = where.split(".")
        for cut in range(len(parts), 0, -1):
            candidates.append(".".join([*parts[:cut], target]))
        public = [p for p in parts if not p.startswith("_")]
        for cut in range(len(public), 0, -1):
            candidates.append(".".join([*public[:cut], target]))
    documented = _documented(env)
    domain = env.domains["py"]
    for candidate in candidates:
        obj = _lookup(candidate)
        name = None if obj is None else documented.get(id(obj))
        if name is not None:
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, "obj", name, node, contnode
            )
    return None


def setup(app):
    app.connect("missing-reference", _missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
