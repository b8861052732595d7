"""The README's commands are the ones CI and users run, and its links and the docs' lead
somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
"""README.md is the front door; the rest lives in docs/."""

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
"""A markdown link or image, `[text](target)` or `![alt](target "title")`: group 1 is the
target."""


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _relative_targets(text: str) -> list[str]:
    """The relative link targets in `text`, each without its #anchor (pure anchors, web and
    mail links left out)."""
    targets = []
    for target in LINK.findall(text):
        if target.startswith(("#", "http://", "https://", "mailto:")):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path) -> list[str]:
    """Relative links in the markdown file `path` that name no file or folder beside it."""
    return [t for t in _relative_targets(path.read_text())
            if not (path.parent / t).exists()]


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("pip install")
    assert ci_command in (ROOT / "README.md").read_text()


def test_readme_main_command_is_the_run_job_on_the_builtin_target():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("##")[0]
    assert "pip install -e .\naurora-jax run\n" in quick  # the default config: builtin target
    assert "aurora-jax generate --prompt" in readme


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move detail to docs/")


def test_link_targets_are_found_as_markdown_writes_them():
    text = ('see [a](docs/a.md#part), ![b](b.png "title"), [c](https://x.org/c.md), '
            "[d](#anchor), [e](mailto:x@y.org), [f](../configs/f.yaml)")
    assert _relative_targets(text) == ["docs/a.md", "b.png", "../configs/f.yaml"]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    files = _markdown_files()
    assert len(files) > 1, "docs/*.md missing"
    broken = {p.relative_to(ROOT).as_posix(): b for p in files if (b := broken_links(p))}
    assert not broken, f"links to nothing, relative to the file holding them: {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    linked = {t for t in _relative_targets(readme) if t.startswith("docs/")}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
