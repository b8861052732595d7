"""The README's commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("pip install")
    assert ci_command in (ROOT / "README.md").read_text()


def test_readme_main_command_uses_the_builtin_target():
    readme = (ROOT / "README.md").read_text()
    assert "aurora-jax generate --prompt" in readme
