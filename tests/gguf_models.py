"""Tiny GGUF files written in the tests: random Hugging Face Llama / Qwen3 models exported the
way llama.cpp's converter does (GGUF names, Llama Q/K rows permuted), with quantized tensors
from `gguf.quants` and a small byte-level BPE tokenizer in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. "
        "It's 2024 and we've got 12345 reasons; don't you think so? Über naïve café.\n") * 20
# Weight types cycled over the 2-D tensors: every family of quantization we promise.
QUANT_CYCLE = ("Q8_0", "Q4_K", "Q4_0", "Q5_K", "Q4_1", "Q6_K", "F16", "BF16", "Q5_0")
# Byte offsets of the float16 scales in one K-quant block, and their magnitude: random
# payload bytes with these scales give weights of a few hundredths.
_K_SCALES = {"Q4_K": ((0, 2), 2e-4), "Q5_K": ((0, 2), 1e-4), "Q6_K": ((208,), 3e-5)}


def train_bpe(vocab_size: int = 300):
    """A byte-level BPE trained on TEXT, special tokens first: (tokens, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def hf_model(family: str, vocab: int, *, hidden=256, inter=512, layers=2, heads=4, kv=2,
             head_dim=64, tie=False, seed=0):
    """A random transformers Llama/Qwen3 model (norm weights away from 1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  head_dim=head_dim, max_position_embeddings=256, tie_word_embeddings=tie,
                  initializer_range=0.05, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, use_sliding_window=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval().float()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (rotate-half halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _quantized(w: np.ndarray, kind: str, rng) -> tuple[np.ndarray, object]:
    """(data, raw type) for GGUFWriter.add_tensor; K quants get random blocks (gguf.quants
    cannot quantize them in numpy), whose dequantized values become the weights."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in _K_SCALES:
        return quantize(w.astype(np.float32), qtype), qtype
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    data = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    offsets, scale = _K_SCALES[kind]
    for off in offsets:
        d = (scale * (1 + rng.random((rows, cols // block_elems)))).astype(np.float16)
        data[..., off:off + 2] = d.view(np.uint8).reshape(rows, cols // block_elems, 2)
    return data.reshape(rows, -1), qtype


def write_gguf(path: Path, family: str = "llama", *, quant: bool = True, tie: bool = False,
               arch: str | None = None, extra: dict | None = None, seed: int = 0):
    """Writes a random model as GGUF; returns (path, tokens). `extra` maps GGUF tensor names
    to (array, raw type) pairs that replace or add tensors (for broken-file tests)."""
    import gguf

    tokens, merges = train_bpe()
    # transformers' GGUF reader takes Qwen3's head_dim from its default (128), not the file
    shape = dict(heads=2, kv=1, head_dim=128) if family == "qwen3" else {}
    model = hf_model(family, len(tokens), tie=tie, seed=seed, **shape)
    cfg = model.config
    rng = np.random.default_rng(seed)
    arch = arch or family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if family == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(family == "llama")
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    extra = dict(extra or {})
    n2d = 0
    for name, t in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
        arr = t.numpy().astype(np.float32)
        if family == "llama" and name.endswith("q_proj.weight"):
            arr = _permute(arr, cfg.num_attention_heads)
        if family == "llama" and name.endswith("k_proj.weight"):
            arr = _permute(arr, cfg.num_key_value_heads)
        if gname in extra:
            data, raw = extra.pop(gname)
            w.add_tensor(gname, data, raw_dtype=raw)
        elif arr.ndim == 2 and quant:
            data, raw = _quantized(arr, QUANT_CYCLE[n2d % len(QUANT_CYCLE)], rng)
            w.add_tensor(gname, data, raw_dtype=raw)
            n2d += 1
        else:
            w.add_tensor(gname, arr)
    for gname, (data, raw) in extra.items():
        w.add_tensor(gname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tokens
