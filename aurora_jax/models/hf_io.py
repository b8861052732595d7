"""Hugging Face checkpoint I/O for the target: config.json + (sharded) safetensors.

Loading builds the model abstractly (no random weights are ever materialised), then reads,
converts and places one tensor at a time with its final sharding, so host memory holds at most
one tensor beyond the memory-mapped files. Saving writes the same layout back (transformers can
load it), shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from aurora_jax.errors import CheckpointError
from aurora_jax.models.config import DTYPES, TargetConfig, device_dtype, read_hf_config
from aurora_jax.models.gguf_io import GGUFCheckpoint, is_gguf
from aurora_jax.models.layers import rope_inv_freq
from aurora_jax.models.safetensors_io import SafetensorsFile, write_safetensors
from aurora_jax.models.sharding import make_mesh, param_sharding, state_path
from aurora_jax.models.transformer import Target, Transformer

log = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights of ours (old transformers saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Our state path -> (Hugging Face tensor name, whether the matrix is transposed)."""
    if path == ("embed",):
        return "model.embed_tokens.weight", False
    if path == ("norm", "weight"):
        return "model.norm.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    if path[0] == "layers":
        i, rest = path[1], path[2:]
        prefix = f"model.layers.{i}."
        if rest[0] == "attn":
            return prefix + f"self_attn.{rest[1]}.weight", rest[-1] == "kernel"
        if rest[0] == "mlp":
            return prefix + f"mlp.{rest[1]}.weight", True
        return prefix + f"{rest[0]}.weight", False
    raise KeyError(f"no Hugging Face name for state path {'.'.join(path)}")


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {path}"
                + (f" (found {found})" if found else ""))
        single = path / found[0]
    return dict.fromkeys(SafetensorsFile(single).keys(), single)


class TensorReader:
    """Reads named tensors from a checkpoint's files, checking shapes, one tensor at a time."""

    def __init__(self, path: Path, files: dict[str, Path]):
        self.path, self.files = path, files
        self.opened: dict[Path, SafetensorsFile] = {}
        self.used: set[str] = set()

    def read(self, name: str, shape: tuple[int, ...], transpose: bool, dtype, sharding):
        """The tensor `name` as an array of `shape` (after transposing) placed by `sharding`."""
        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        f = self.files[name]
        if f not in self.opened:
            self.opened[f] = SafetensorsFile(f)
        if name not in self.opened[f].entries:
            raise CheckpointError(f"{f}: tensor {name!r} listed in the index but not in the file")
        arr = self.opened[f].get(name)
        if transpose:
            arr = arr.T
        if arr.shape != tuple(shape):
            want = tuple(shape)[::-1] if transpose else tuple(shape)
            raise CheckpointError(
                f"{f}: tensor {name!r} has shape {list(self.opened[f].shape(name))}, the config "
                f"implies {list(want)}")
        self.used.add(name)
        return jax.device_put(np.asarray(arr, dtype=dtype), sharding)

    def unused(self) -> list[str]:
        """Checkpoint tensors no read has used."""
        return sorted(n for n in self.files if n not in self.used)


def _resolve_dtype(dtype: str, path: Path) -> str:
    if dtype == "auto":
        own = None  # quantized (GGUF) weights have no dtype of their own
        if not is_gguf(path):
            raw = json.loads((path / "config.json").read_text())
            own = raw.get("dtype") or raw.get("torch_dtype")
        dtype = device_dtype(dtype, own)
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return dtype


def load_target(path: str | Path, *, dtype: str = "float32", mesh=None,
                cfg_overrides: dict | None = None, progress: bool = False) -> Target:
    """Loads a Llama/Qwen3 target onto `mesh` (default: 1 device) from a Hugging Face
    checkpoint directory or a GGUF file (dequantized tensor by tensor into `dtype`)."""
    path = Path(path)
    reader: GGUFCheckpoint | TensorReader
    if is_gguf(path):
        reader = GGUFCheckpoint(path)
        cfg = reader.config()
    else:
        cfg = read_hf_config(path)
        reader = TensorReader(path, weight_files(path))
    if cfg_overrides:
        cfg = dataclasses.replace(cfg, **cfg_overrides)
    dtype = _resolve_dtype(dtype, path)
    mesh = mesh or make_mesh(tp=1, devices=jax.devices()[:1])
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)

    def load_leaf(keypath, sds):
        p = state_path(keypath)
        sharding = param_sharding(mesh, p, sds.shape)
        if p == ("inv_freq",):
            return jax.device_put(rope_inv_freq(cfg), sharding)
        name, transpose = hf_name(p)
        return reader.read(name, sds.shape, transpose, DTYPES[dtype], sharding)

    from tqdm import tqdm

    with tqdm(total=len(jax.tree.leaves(abstract_state)), desc="load", unit="tensor",
              disable=not progress, file=sys.stderr) as bar:
        def counted(keypath, sds):
            bar.update()
            return load_leaf(keypath, sds)

        state = jax.tree_util.tree_map_with_path(counted, abstract_state)
    unused = [n for n in reader.unused() if not n.endswith(_IGNORED_SUFFIXES)
              and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unused:
        log.warning("%s: %d checkpoint tensors not used by the model: %s", path, len(unused),
                    unused[:5])
    return Target(cfg=cfg, graphdef=graphdef, state=state, mesh=mesh, dtype=dtype)


def save_target(path: str | Path, cfg: TargetConfig, state: nnx.State, *, dtype: str | None = None,
                max_shard_bytes: int = 4 << 30) -> Path:
    """Writes config.json, generation_config.json and safetensors (sharded past the limit)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = [(state_path(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    named = [(hf_name(p), x) for p, x in flat if p != ("inv_freq",)]
    dtype = dtype or str(named[0][1].dtype)
    write_tensors(path, [(name, tr, x, DTYPES[dtype]) for (name, tr), x in named],
                  max_shard_bytes)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype), indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1
           else cfg.eos_token_ids[0]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def write_tensors(path: Path, tensors: list[tuple[str, bool, jax.Array, Any]],
                  max_shard_bytes: int = 4 << 30) -> None:
    """Writes (name, transpose, array, dtype) as model.safetensors, or as numbered shards with
    an index past `max_shard_bytes`; only one shard is ever fetched to host memory."""
    plan: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[2].shape)) * np.dtype(t[3]).itemsize
        if size + nbytes > max_shard_bytes and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append(t)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(plan):
        fname = ("model.safetensors" if len(plan) == 1
                 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors")
        arrays = []
        for name, transpose, x, dtype in shard:
            arr = np.asarray(jax.device_get(x)).astype(dtype)
            arrays.append((name, arr.T if transpose else arr))
            weight_map[name] = fname
        write_safetensors(path / fname, arrays, metadata={"format": "pt"})
    if len(plan) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=2))


def convert_gguf(gguf_path: str | Path, out: str | Path, *, dtype: str = "float32",
                 progress: bool = False) -> Path:
    """Writes a GGUF target as a Hugging Face checkpoint directory (config.json,
    generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that
    transformers and `load_target` read. The directory appears complete or not at all."""
    import os
    import shutil

    out = Path(out)
    ckpt = GGUFCheckpoint(gguf_path)
    spec = ckpt.tokenizer_spec()  # checked before any weight is read
    target = load_target(gguf_path, dtype=dtype, progress=progress)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_target(tmp, target.cfg, target.state, dtype=dtype)
        spec.build().save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(spec.tokenizer_config(), indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
