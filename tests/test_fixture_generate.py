"""On the real fixture checkpoint, greedy generation equals transformers' greedy generate."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.models.hf_io import load_target


def held_out_prompts(fixture: Path, n: int = 3) -> list[str]:
    files = json.loads((fixture / "held_out_files.json").read_text())["stdlib_files_held_out"]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for rel in files:
        p = stdlib / rel
        if p.is_file():
            text = p.read_text(errors="replace")
            prompts.append(text[: 150 + 97 * len(prompts)])  # different lengths
        if len(prompts) == n:
            return prompts
    pytest.fail("held-out standard-library files not found")


def test_greedy_64_tokens_match_transformers(llama_16m):
    tok = Tokenizer.load(llama_16m)
    hf_tok = transformers.AutoTokenizer.from_pretrained(llama_16m)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_16m).eval().float()
    prompts = held_out_prompts(llama_16m)
    ids = [tok.encode(p) for p in prompts]
    assert ids == [hf_tok(p).input_ids for p in prompts]
    ours = TargetGenerator(load_target(llama_16m)).generate(ids, 64)
    for prompt_ids, c in zip(ids, ours.completions, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False)
        ref = out[0, len(prompt_ids):].tolist()
        assert c.token_ids == ref
        assert len(ref) == 64 or ref[-1] == 1
