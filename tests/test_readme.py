"""The README's Python blocks run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


def test_readme_blocks_run_in_order():
    namespace: dict = {}
    for block in BLOCKS:
        try:
            exec(compile(_dedent(block), str(README), "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message says which block failed
            pytest.fail(f"README block failed: {e!r}\n{block}")


def _dedent(block: str) -> str:
    import textwrap

    return textwrap.dedent(block)
