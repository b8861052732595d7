"""Two owners: one module assembles serving engines (aurora_jax/stack.py) and one module swaps
drafts (engine/channel.py). Read from the package's own source, so that a second place that
builds engines or swaps drafts behind the channel's back fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aurora_jax"
MEASURING = "accelerators"
"""The accelerator check builds one engine per setting to time it, and never serves."""


def _calls(name: str, attribute: bool) -> dict[str, int]:
    """Module path -> how many calls it makes to `name` (a plain name, or with `attribute` a
    method of any object)."""
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            hit = (isinstance(f, ast.Attribute) and f.attr == name if attribute
                   else isinstance(f, ast.Name) and f.id == name)
            if hit:
                key = path.relative_to(PACKAGE).as_posix()
                found[key] = found.get(key, 0) + 1
    return found


def test_one_module_builds_the_engines_that_serve():
    builders = {m for m in _calls("Engine", attribute=False)
                if not m.startswith(MEASURING + "/")}
    assert builders == {"stack.py"}


def test_one_module_swaps_drafts():
    assert set(_calls("set_draft", attribute=True)) == {"engine/channel.py"}
