"""`aurora-jax generate --json` on a real checkpoint."""

from __future__ import annotations

import json

from aurora_jax.cli import main
from aurora_jax.data.tokenizer import Tokenizer


def test_generate_json(llama_16m, capsys):
    rc = main(["generate", "--target", str(llama_16m), "--prompt", "import os\n",
               "--max-new-tokens", "12", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "tokens_per_s"} <= out.keys()
    assert 1 <= len(out["token_ids"]) <= 12 and out["generated_tokens"] == len(out["token_ids"])
    assert out["text"] == Tokenizer.load(llama_16m).decode(out["token_ids"])
    assert out["tokens_per_s"] > 0


def test_sampling_is_seeded(llama_16m, capsys):
    args = ["generate", "--target", str(llama_16m), "--prompt", "def ", "--max-new-tokens", "16",
            "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--json"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
