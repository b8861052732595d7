"""Bad input gives one clear error naming the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from aurora_jax.cli import main
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.errors import CheckpointError, PromptError
from aurora_jax.models.hf_io import load_target
from aurora_jax.models.safetensors_io import SafetensorsFile, write_safetensors


@pytest.fixture
def ckpt(tmp_path, small_ckpt):
    """A writable copy of the fixture."""
    out = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, out)
    for p in out.iterdir():
        p.chmod(0o644)
    return out


def _rewrite(path, edit):
    """Rewrites model.safetensors after `edit(dict of arrays)`."""
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    edit(tensors)
    del f
    write_safetensors(path / "model.safetensors", tensors.items())


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_target(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_target(tmp_path)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MixtralForCausalLM"], "mixtral"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*Mixtral"):
        load_target(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_target(ckpt)


def test_tensor_with_wrong_shape(ckpt):
    name = "model.layers.2.self_attn.k_proj.weight"
    _rewrite(ckpt, lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*shape \[16, 64\].*\[32, 64\]"):
        load_target(ckpt)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.3.mlp.up_proj.weight.*missing"):
        load_target(ckpt)


def test_prompt_longer_than_model_maximum(small_ckpt):
    gen = TargetGenerator(load_target(small_ckpt))
    with pytest.raises(PromptError, match="2100 tokens.*maximum length of 512"):
        gen.generate([[5] * 2100], 8)
    with pytest.raises(PromptError, match="empty prompt"):
        gen.generate([[]], 8)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["generate", "--target", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "aurora-jax: error: checkpoint path does not exist" in err
    assert "Traceback" not in err
