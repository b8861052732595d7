"""GGUF targets: what we read from a GGUF file computes what transformers computes from the same
file (its own dequantizer and Q/K un-permutation), the tokenizer agrees with transformers', a
conversion to Hugging Face format loads in transformers with equal logits, and broken files
fail with one line that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import full_forward_logits
from gguf_models import SPECIALS, TEXT, write_gguf

from aurora_jax.cli import main
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import CheckpointError
from aurora_jax.models import gguf_io
from aurora_jax.models.hf_io import load_target

CASES = [("llama", False), ("llama", True), ("qwen3", False)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """GGUF files (one per case) and transformers' logits for them on fixed token ids."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, tie in CASES:
        path, tokens = write_gguf(d / f"{family}-{'tied' if tie else 'untied'}.gguf", family,
                                  tie=tie)
        ids = np.random.RandomState(0).randint(3, len(tokens), size=(2, 48))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        out[(family, tie)] = (path, ids, ref)
    return out


@pytest.mark.parametrize("family,tie", CASES)
def test_logits_match_transformers_on_the_same_file(files, family, tie):
    path, ids, ref = files[(family, tie)]
    ours, target = full_forward_logits(path, ids)
    assert target.cfg.family == family and target.cfg.tie_word_embeddings == tie
    kinds = {t.tensor_type.name for t in gguf_io.GGUFCheckpoint(path).tensors.values()}
    assert {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"} <= kinds
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_wrong_permutation_or_dequantization_would_fail(files, monkeypatch):
    """The parity test can see the two mistakes a GGUF reader can make."""
    path, ids, ref = files[("llama", False)]
    monkeypatch.setattr(gguf_io, "unpermute_rows", lambda w, heads: w)
    ours, _ = full_forward_logits(path, ids)
    assert not np.allclose(ours, ref, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()

    import gguf.quants

    real = gguf.quants.dequantize

    def blocks_rotated(data, qtype):  # a layout slip: each row's blocks one place off
        out = real(data, qtype)
        return np.roll(out, 32, axis=-1) if qtype.name.startswith("Q") else out

    monkeypatch.setattr(gguf.quants, "dequantize", blocks_rotated)
    ours, _ = full_forward_logits(path, ids)
    assert not np.allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tokenizer_agrees_with_transformers_and_round_trips(files, family):
    path = files[(family, False)][0]
    ours = Tokenizer.load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [TEXT[:300], "  spaced   out\n\n\t12345 6789", "naïve Über café's", "x" * 50,
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    for text in texts[:-1]:
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<|im_end|>")[-1] == 2  # special tokens stay whole
    assert (ours.bos_id, ours.eos_ids[0]) == (1, 2)
    chat = [{"role": "user", "content": "hello there"}]
    assert ours.encode_chat(chat) == theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                                tokenize=True)["input_ids"]


def test_convert_writes_a_checkpoint_transformers_loads_with_equal_logits(files, tmp_path):
    path, ids, ref = files[("llama", False)]
    out = tmp_path / "hf"
    assert main(["convert", "--gguf", str(path), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval().float()
    with torch.no_grad():
        converted = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(converted, ref, rtol=1e-4, atol=1e-4)
    ours, theirs = Tokenizer.load(out), transformers.AutoTokenizer.from_pretrained(out)
    assert ours.encode(TEXT[:200]) == theirs(TEXT[:200])["input_ids"] == \
        Tokenizer.load(path).encode(TEXT[:200])
    assert ours.chat_template and set(SPECIALS) <= set(theirs.all_special_tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing staged is left


def test_broken_files_fail_with_one_line(files, tmp_path, capsys):
    import gguf

    good = files[("llama", False)][0]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    phi = write_gguf(tmp_path / "phi.gguf", "llama", quant=False, arch="phi2")[0]
    ints = np.zeros((64, 256), np.int32)
    odd = write_gguf(tmp_path / "int.gguf", "llama", quant=False, extra={
        "blk.0.attn_v.weight": (ints, gguf.GGMLQuantizationType.I32)})[0]
    cases = [(truncated, "truncated"), (phi, "unsupported architecture 'phi2'"),
             (odd, "blk.0.attn_v.weight' has quantization type I32, which is not supported"),
             (tmp_path / "missing.gguf", "does not exist")]
    for path, message in cases:
        with pytest.raises(CheckpointError) as e:
            load_target(path)
        assert message in str(e.value), (path, str(e.value))
        out = tmp_path / f"hf-{path.stem}"
        capsys.readouterr()
        assert main(["convert", "--gguf", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_generate_serves_a_gguf_target_with_chat_prompts(files, tmp_path, capsys):
    path = files[("llama", False)][0]
    tok = Tokenizer.load(path)
    args = ["generate", "--target", str(path), "--max-new-tokens", "6", "--json"]
    assert main(args + ["--prompt", "hello there", "--chat"]) == 0
    out = json.loads(capsys.readouterr().out)
    chat = [{"role": "user", "content": "hello there"}]
    assert out["prompt_tokens"] == len(tok.encode_chat(chat)) > len(tok.encode("hello there"))
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": chat, "id": "m"}) + "\n"
                 + json.dumps({"prompt": "def f(x):", "id": "p"}) + "\n")
    assert main(args + ["--prompts", str(f)]) == 0
    lines = {x["id"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["m"]["token_ids"] == out["token_ids"]  # the same chat turn, the same greedy
    f.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert main(args + ["--prompts", str(f)]) == 2
    assert "p.jsonl:1: chat messages must be" in capsys.readouterr().err
