"""Language-model training windows as a grain pipeline.

Tokenized documents are joined into one stream (each document already begins with bos; an eos
closes it, so the model learns where a document ends), cut into windows of `seq_len + 1`
tokens that overlap by one token (window i covers stream[i*T : i*T + T + 1], so every token is
a prediction target exactly once per epoch), then shuffled, repeated and batched by grain.

The pipeline is a `grain.MapDataset`, so its iterator's position is a small dict
(`get_state()` / `set_state()`): saved beside the model checkpoint it makes a resumed run see
exactly the batches the uninterrupted run would have seen. Each epoch is reshuffled with a seed
derived from `seed` and the epoch number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grain
import numpy as np


def pack_documents(docs: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """One int32 stream: every document followed by eos."""
    parts = []
    for ids in docs:
        parts.append(np.asarray(ids, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def windows(stream_N: np.ndarray, seq_len: int) -> np.ndarray:
    """[W, seq_len + 1] int32 windows with stride seq_len (a view; the stream's tail that does
    not fill a window is dropped)."""
    if len(stream_N) < seq_len + 1:
        raise ValueError(f"a stream of {len(stream_N)} tokens holds no window of {seq_len + 1}")
    view = np.lib.stride_tricks.sliding_window_view(stream_N, seq_len + 1)
    return view[::seq_len]


def training_dataset(windows_WxT1: np.ndarray, batch_size: int, seed: int) -> grain.IterDataset:
    """Endless [batch_size, seq_len + 1] int32 batches, shuffled per epoch, checkpointable."""
    if len(windows_WxT1) < batch_size:
        raise ValueError(f"{len(windows_WxT1)} windows do not fill one batch of {batch_size}")
    ds = (grain.MapDataset.source(windows_WxT1)
          .shuffle(seed=seed)
          .repeat()  # shuffle before repeat: grain reseeds the permutation every epoch
          .batch(batch_size, drop_remainder=True))
    # Reading is a numpy slice: one reader thread is plenty and leaves the cores to XLA.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(windows_WxT1: np.ndarray, batch_size: int,
                 max_windows: int) -> list[tuple[np.ndarray, int]]:
    """Fixed evaluation batches over the first `max_windows` windows, as (batch, valid rows).

    Every batch has the training batch shape (the last one is padded by repeating its final
    window) so evaluation compiles once; only the first `valid rows` of a batch count.
    """
    w = windows_WxT1[:max_windows]
    out = []
    for i in range(0, len(w), batch_size):
        chunk = w[i:i + batch_size]
        pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)
        out.append((np.concatenate([chunk, pad]).astype(np.int32), len(chunk)))
    return out
