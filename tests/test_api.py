"""The public API: every name `aurora_jax` exports resolves, and the README's Python example
uses nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import aurora_jax

ROOT = Path(__file__).parents[1]


def test_every_export_resolves_to_its_module():
    assert sorted(aurora_jax.__all__) == sorted(aurora_jax._EXPORTS)
    for name, module in aurora_jax._EXPORTS.items():
        obj = getattr(aurora_jax, name)
        assert obj.__module__ == module, name  # defined there, not re-exported from elsewhere


def test_readme_python_example_uses_only_the_public_api():
    readme = (ROOT / "README.md").read_text()
    example = readme.split("From Python")[1].split("```python")[1].split("```")[0]
    imports = re.findall(r"^(?:from|import) .*$", example, flags=re.M)
    assert len(imports) <= 2, imports
    for line in imports:
        assert line.startswith(("import aurora_jax", "from aurora_jax import")), line
    used = set(re.findall(r"\baj\.(\w+)", example))
    assert used and used <= set(aurora_jax.__all__), used - set(aurora_jax.__all__)
