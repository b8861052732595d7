"""`aurora-jax generate --json` on a real checkpoint."""

from __future__ import annotations

import json

from aurora_jax.cli import main
from aurora_jax.data.tokenizer import Tokenizer


def test_generate_json(small_ckpt, capsys):
    rc = main(["generate", "--target", str(small_ckpt), "--prompt", "import os\n",
               "--max-new-tokens", "12", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "tokens_per_s"} <= out.keys()
    assert 1 <= len(out["token_ids"]) <= 12 and out["generated_tokens"] == len(out["token_ids"])
    assert out["text"] == Tokenizer.load(small_ckpt).decode(out["token_ids"])
    assert out["tokens_per_s"] > 0


def test_generate_prints_the_answer_alone(small_ckpt, capsys):
    """Plain output is the answer alone; --echo puts the prompt before it as a block of its
    own, never run into it (a chat answer glued to its question was the first thing users
    saw)."""
    base = ["generate", "--target", str(small_ckpt), "--prompt", "import os", "--max-new-tokens",
            "8"]
    assert main(base + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert main(base) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(base + ["--echo"]) == 0
    assert capsys.readouterr().out == "import os\n\n" + text + "\n"


def test_sampling_is_seeded(small_ckpt, capsys):
    args = ["generate", "--target", str(small_ckpt), "--prompt", "def ", "--max-new-tokens", "16",
            "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--json"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_speculative_generate_json(small_ckpt, tmp_path, capsys):
    """--draft PATH --spec chain gives the target's own greedy tokens, with the speculation
    counters; a draft for another target is refused with one line."""
    from aurora_jax.models.config import read_hf_config
    from aurora_jax.models.eagle3 import DraftConfig, init_draft
    from aurora_jax.models.eagle3_io import save_draft

    cfg = read_hf_config(small_ckpt)
    save_draft(tmp_path / "draft", init_draft(DraftConfig.for_target(cfg), seed=1))
    base = ["generate", "--target", str(small_ckpt), "--prompt", "class Foo:\n",
            "--max-new-tokens", "10", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--draft", str(tmp_path / "draft"), "--spec", "chain", "--depth", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["spec"] == "chain"
    assert spec["acceptance_length"] >= 1.0
    n = len(spec["token_ids"])  # each forward emits 1 to depth + 1 tokens
    assert 1 + (n - 1) / 4 <= spec["target_forwards"] <= n
    small = DraftConfig(hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                        head_dim=32, vocab_size=cfg.vocab_size, draft_vocab_size=512,
                        target_hidden_size=32)
    save_draft(tmp_path / "other", init_draft(small))
    assert main(base + ["--draft", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the target" in err[0]
    assert main(base + ["--spec", "tree"]) == 2
    assert "needs a draft" in capsys.readouterr().err


def test_prompts_file_prints_one_json_line_per_request(small_ckpt, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "import os\\n", "id": "a", "domain": "code"}\n\n'
                 '{"prompt": "The file"}\n{"prompt": "def f(x):", "domain": "code"}\n')
    assert main(["generate", "--target", str(small_ckpt), "--prompts", str(f),
                 "--max-new-tokens", "8", "--max-slots", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(str(x["id"]) for x in lines) == ["1", "2", "a"]
    for x in lines:
        assert {"id", "token_ids", "acceptance_length", "draft_version", "domain"} <= x.keys()
        assert 1 <= len(x["token_ids"]) <= 8
    # Each line is its own prompt's output: the greedy tokens of a run of that prompt alone
    # (the outputs differ, so lines that swapped requests would not match).
    prompts = {"a": "import os\n", "1": "The file", "2": "def f(x):"}
    alone = {}
    for key, text in prompts.items():
        assert main(["generate", "--target", str(small_ckpt), "--prompt", text,
                     "--max-new-tokens", "8", "--json"]) == 0
        alone[key] = json.loads(capsys.readouterr().out)["token_ids"]
    assert len({tuple(t) for t in alone.values()}) == 3
    assert {str(x["id"]): x["token_ids"] for x in lines} == alone
    assert {str(x["id"]): x["domain"] for x in lines} == {"a": "code", "1": None, "2": "code"}


def test_bad_prompts_file_is_refused_before_anything_runs(small_ckpt, tmp_path, capsys):
    cases = {'{"prompt": "ok"}\n{"prompt": 3}\n': 'p.jsonl:2: expected an object',
             '{"prompt": "ok"}\nnot json\n': "p.jsonl:2: not valid JSON",
             '{"prompt": "ok", "domian": "code"}\n': "unknown field(s) ['domian']",
             '{"prompt": "ok", "messages": []}\n': 'p.jsonl:1: expected an object',
             "": "no prompts"}
    for text, message in cases.items():
        (tmp_path / "p.jsonl").write_text(text)
        assert main(["generate", "--target", str(small_ckpt), "--prompts",
                     str(tmp_path / "p.jsonl")]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--target", str(small_ckpt), "--prompt", "x", "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert main(["generate", "--target", str(small_ckpt), "--prompt", "x", "--online"]) == 2
    assert "--online learns across requests" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n')
    assert main(["generate", "--target", str(small_ckpt), "--prompts", str(tmp_path / "p.jsonl"),
                 "--online", "--workdir", str(tmp_path / "w")]) == 2
    assert "pick one" in capsys.readouterr().err
    assert main(["generate", "--target", str(small_ckpt), "--prompt", "x", "--workdir",
                 str(tmp_path / "w")]) == 2
    assert "--workdir learns across requests" in capsys.readouterr().err
    assert main(["learn", "--workdir", str(tmp_path / "w"),
                 f"target={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
