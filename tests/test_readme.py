"""The README's commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("pip install")
    assert ci_command in (ROOT / "README.md").read_text()


def test_readme_main_command_is_the_run_job_on_the_builtin_target():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("##")[0]
    assert "pip install -e .\naurora-jax run\n" in quick  # the default config: builtin target
    assert "aurora-jax generate --prompt" in readme
