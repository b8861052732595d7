"""GGUF checkpoints (llama.cpp's single-file format) for the target: config, weights, tokenizer.

Read with the `gguf` package, llama.cpp's own reader: the file is memory-mapped and each tensor
is dequantized on its own (`gguf.quants.dequantize`, float32 for that one tensor) and cast to
the requested dtype, so host memory never holds a float32 copy of the whole model.

What differs from a Hugging Face checkpoint, and is undone here:
- Names: `token_embd`, `blk.{i}.attn_q`, ... instead of `model.embed_tokens`, ...
- Shapes: GGUF lists dimensions fastest-first; the reader's arrays are already [out, in] like
  torch's `nn.Linear.weight`.
- Llama Q/K rows: llama.cpp's converter permutes the rows of q_proj and k_proj of the `llama`
  architecture (from the Hugging Face "rotate half" RoPE layout to interleaved pairs); the
  inverse permutation is applied on read. Qwen3 files keep the Hugging Face layout.
- The tokenizer is metadata: `tokenizer.ggml.{model,pre,tokens,merges,token_type,...}` and
  `tokenizer.chat_template`. The gpt2-style byte-level BPE (SmolLM2, Llama-3, Qwen) is rebuilt
  as a `tokenizers` tokenizer with the pre-tokenizer split the `pre` name stands for.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np

from aurora_jax.errors import CheckpointError
from aurora_jax.models.config import RopeScaling, TargetConfig

log = logging.getLogger(__name__)

# GGUF tensor types we dequantize: the float types and llama.cpp's weight quantizations that
# the gguf package dequantizes (not integer tensors, nor Q8_K/Q8_1, which hold activations).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                   "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
                   "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")
SUPPORTED_ARCHITECTURES = ("llama", "qwen3")
# Hugging Face name pieces -> GGUF name pieces (per layer, then global).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# Pre-tokenizer splits by `tokenizer.ggml.pre` (the regexes of the models' own tokenizers).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# Pre-tokenizers that are GPT-2's regex, with digits split one by one first (SmolLM2, ...).
_GPT2_DIGITS = ("smollm", "starcoder", "refact")
# Control tokens that end a turn or a text, stop tokens besides the file's eos id.
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by suffix; the content is checked on open)."""
    return Path(path).suffix.lower() == ".gguf"


def hf_to_gguf_name(name: str) -> str:
    """Hugging Face tensor name -> GGUF tensor name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"
    raise KeyError(f"no GGUF name for {name!r}")


def unpermute_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves).

    llama.cpp writes row (h, i, p) of head h at (h, p, i) for i < D/2, p in {0, 1}, where the
    Hugging Face row of a head is p * D/2 + i; so reading [H, D/2, 2] and swapping the last two
    axes recovers [H, 2, D/2].
    """
    out, rest = w_OxI.shape[0], w_OxI.shape[1:]
    d = out // num_heads
    return (w_OxI.reshape(num_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest))


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int):
    """The parsed file (header, metadata, tensor table; the data stays memory-mapped). Parsing
    a 49k-token vocabulary takes about 2 s, and loading a target, its tokenizer and converting
    both open the same file, so one parse per file version serves them all."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or damaged GGUF file ({e})") from e


class GGUFCheckpoint:
    """An open GGUF file: metadata, the target config, and tensors read one at a time.

    `read` has the signature of hf_io.TensorReader.read, so load_target places GGUF tensors the
    same way as safetensors ones.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file does not exist: {self.path}")
        stat = self.path.stat()
        self.reader = _parse(str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.tensors = {t.name: t for t in self.reader.tensors}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in self.reader.tensors), default=0)
        if end > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: truncated GGUF file (tensor data ends at byte "
                                  f"{end}, the file has {self.path.stat().st_size})")
        odd = [(n, t.tensor_type.name) for n, t in self.tensors.items()
               if t.tensor_type.name not in SUPPORTED_TYPES]
        if odd:
            raise CheckpointError(
                f"{self.path}: tensor {odd[0][0]!r} has quantization type {odd[0][1]}, which is "
                f"not supported ({len(odd)} such tensors; supported: "
                f"{', '.join(SUPPORTED_TYPES)})")
        self.arch = self.get("general.architecture")
        self.used: set[str] = set()

    # ------------------------------------------------------------------ metadata
    def get(self, key: str, default=KeyError):
        """A metadata value (strings decoded, arrays as lists); `default` if absent."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def config(self) -> TargetConfig:
        """The target config from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
        arch = self.arch
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{self.path}: unsupported architecture {arch!r}; supported: "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if "rope_freqs.weight" in self.tensors:
            raise CheckpointError(f"{self.path}: RoPE frequency factors (Llama-3.1 rope scaling) "
                                  "in GGUF are not supported; convert the Hugging Face "
                                  "checkpoint instead")
        hidden = int(self.get(f"{arch}.embedding_length"))
        heads = int(self.get(f"{arch}.attention.head_count"))
        vocab = self.get(f"{arch}.vocab_size", None)
        if vocab is None:
            vocab = len(self.get("tokenizer.ggml.tokens"))
        scaling = None
        if self.get(f"{arch}.rope.scaling.type", "none") == "linear":
            scaling = RopeScaling(kind="linear",
                                  factor=float(self.get(f"{arch}.rope.scaling.factor")))
        eos = [self.get("tokenizer.ggml.eos_token_id", None)]
        eos += [self.get("tokenizer.ggml.eot_token_id", None)] + self._end_token_ids()
        try:
            return TargetConfig(
                family=arch, vocab_size=int(vocab), hidden_size=hidden,
                intermediate_size=int(self.get(f"{arch}.feed_forward_length")),
                num_layers=int(self.get(f"{arch}.block_count")), num_heads=heads,
                num_kv_heads=int(self.get(f"{arch}.attention.head_count_kv", heads)),
                head_dim=int(self.get(f"{arch}.attention.key_length", hidden // heads)),
                rms_norm_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=float(self.get(f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=int(self.get(f"{arch}.context_length", 2048)),
                tie_word_embeddings="output.weight" not in self.tensors,
                bos_token_id=self.get("tokenizer.ggml.bos_token_id", None),
                eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
                pad_token_id=self.get("tokenizer.ggml.padding_token_id", None))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from e

    def _end_token_ids(self) -> list[int]:
        tokens = self.get("tokenizer.ggml.tokens", None) or []
        types = self.get("tokenizer.ggml.token_type", None) or [CONTROL] * len(tokens)
        index = {t: i for i, t in enumerate(tokens)}
        return [index[t] for t in _END_TOKENS if t in index and types[index[t]] == CONTROL]

    # ------------------------------------------------------------------ tensors
    def read(self, name: str, shape: tuple[int, ...], transpose: bool, dtype, sharding):
        """The Hugging Face tensor `name` as an array of `shape` placed by `sharding`."""
        import jax

        arr = self.dequantize(name)
        if transpose:
            arr = arr.T
        if arr.shape != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {hf_to_gguf_name(name)!r} has shape "
                                  f"{list(arr.shape)}, the config implies {list(shape)}")
        return jax.device_put(np.asarray(arr, dtype=dtype), sharding)

    def dequantize(self, name: str) -> np.ndarray:
        """The Hugging Face tensor `name` in float32, in Hugging Face layout ([out, in])."""
        from gguf.quants import dequantize

        gname = hf_to_gguf_name(name)
        if gname not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {gname!r} is missing from the GGUF file")
        t = self.tensors[gname]
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        arr = arr.reshape([int(d) for d in reversed(t.shape)])
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            key = "head_count" if "q_proj" in name else "head_count_kv"
            heads = int(self.get(f"llama.attention.{key}",
                                 self.get("llama.attention.head_count")))
            arr = unpermute_rows(arr, heads)
        self.used.add(gname)
        return arr

    def unused(self) -> list[str]:
        """GGUF tensors no read has used (after a load: weights the model ignored)."""
        return sorted(set(self.tensors) - self.used)

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_spec(self) -> TokenizerSpec:
        """What the tokenizer metadata says, checked to be a byte-level BPE we can build."""
        kind = self.get("tokenizer.ggml.model", None)
        if kind != "gpt2":
            raise CheckpointError(f"{self.path}: GGUF tokenizer model {kind!r} is not supported "
                                  "(only the gpt2-style byte-level BPE of SmolLM2, Llama-3 and "
                                  "Qwen); give a Hugging Face tokenizer directory instead")
        tokens = list(self.get("tokenizer.ggml.tokens"))
        return TokenizerSpec(
            tokens=tokens, merges=list(self.get("tokenizer.ggml.merges")),
            token_types=list(self.get("tokenizer.ggml.token_type", [1] * len(tokens))),
            pre=self.get("tokenizer.ggml.pre", "default"),
            bos_id=self.get("tokenizer.ggml.bos_token_id", None),
            eos_ids=self.config().eos_token_ids,
            pad_id=self.get("tokenizer.ggml.padding_token_id", None),
            add_bos=bool(self.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=self.get("tokenizer.chat_template", None))


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE tokenizer as GGUF metadata describes it."""

    tokens: list[str]
    """Vocabulary in id order, spelled in GPT-2's byte-to-unicode alphabet."""
    merges: list[str]
    """BPE merges, "left right", highest priority first."""
    token_types: list[int]
    """llama.cpp token type per id (1 normal, 3 control, 4 user-defined, ...)."""
    pre: str
    """Pre-tokenizer name (llama.cpp's `tokenizer.ggml.pre`)."""
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    add_bos: bool
    """Whether encoding a text starts it with bos."""
    chat_template: str | None
    """The Jinja chat template, if the file has one."""

    def build(self):
        """A `tokenizers.Tokenizer` equal to the model's own."""
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )

        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        if self.pre in _SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[self.pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif self.pre in _GPT2_DIGITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            if self.pre not in ("default", "gpt2"):
                log.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", self.pre)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, k in zip(self.tokens, self.token_types, strict=True) if k == CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, k in zip(self.tokens, self.token_types, strict=True) if k == USER_DEFINED]
        tok.add_special_tokens(special)
        tok.add_tokens(user)
        if self.add_bos and self.bos_id is not None:
            bos = self.tokens[self.bos_id]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json that goes beside tokenizer.json in a converted directory."""
        def name(i):
            return None if i is None else self.tokens[i]

        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_ids[0]) if self.eos_ids else None,
               "pad_token": name(self.pad_id), "add_bos_token": self.add_bos,
               "add_eos_token": False, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg
