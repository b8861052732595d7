"""On the real built-in target (SmolLM2-135M-Instruct, as `aurora-jax prepare` caches it): greedy
generation through the engine equals transformers' greedy generate token for token, with and
without speculation (a warm day-0 draft whose tokens the target accepts, so that committing
accepted tokens to the 30-layer cache is exercised); its tokenizer splits digits one by one as
SmolLM2's own does and applies the chat template as transformers does. Skips when the model
is not prepared."""

from __future__ import annotations

import pytest
import torch
import transformers

from aurora_jax.data.scenarios import humaneval_prompts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.engine.engine import Engine, Request
from aurora_jax.models.loading import load_pair
from aurora_jax.speculative.config import SpecConfig

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = Tokenizer.load(smollm2)
    code = [tok.encode(p) for p in humaneval_prompts()[:2]]
    return tok, code + [tok.encode_chat(MESSAGES)]


def test_tokenizer_matches_smollm2s_own(smollm2, prompts):
    tok, _ = prompts
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2)
    text = "x = 12345 + 0.5  # naïve\n\tdef f():\n"
    assert tok.encode(text) == theirs(text)["input_ids"]
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")
    assert tok.encode_chat(MESSAGES) == theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tok.encode("<|im_end|>") == [2] and 2 in tok.eos_ids


def test_greedy_64_tokens_match_transformers(smollm2, prompts):
    tok, ids = prompts
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval().float()
    want = []
    for p in ids:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                              max_new_tokens=64, do_sample=False, eos_token_id=list(tok.eos_ids),
                              pad_token_id=tok.pad_id)
        want.append(out[0, len(p):].tolist())
    assert want[2][-1] == 2 and len(want[2]) < 64  # the chat answer ends its turn
    # A warm day-0 draft (the target's head and top layer, over the whole vocabulary): unlike a
    # random one it proposes tokens the target accepts.
    target, draft = load_pair(smollm2, "warm")
    kw = dict(max_slots=3, max_len=256, eos_ids=tok.stop_ids(target.cfg.eos_token_ids))
    reqs = [Request(p, 64) for p in ids]
    plain = Engine(target, None, SpecConfig(mode="off"), **kw).run(reqs)
    assert [r.token_ids for r in plain.results] == want
    spec = Engine(target, draft, SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=4),
                  **kw).run(reqs)
    assert [r.token_ids for r in spec.results] == want
    assert spec.acceptance_length > 1.0, "no drafted token was accepted: no commit was tested"
