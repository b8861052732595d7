"""Our safetensors reader/writer interoperates with the reference library."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import safetensors.numpy

from aurora_jax.models.safetensors_io import SafetensorsFile, write_safetensors


def test_round_trip_with_reference_library(tmp_path):
    rs = np.random.RandomState(0)
    tensors = {"a": rs.randn(3, 5).astype(np.float32), "b": rs.randint(0, 9, (7,)).astype(np.int64),
               "c": rs.randn(2, 2, 2).astype(np.float16)}
    write_safetensors(tmp_path / "ours.safetensors", tensors.items())
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        np.testing.assert_array_equal(ours.get(k), v)


def test_bfloat16_round_trip(tmp_path):
    """bfloat16 both ways with the reference library (its torch reader and writer: numpy has no
    bfloat16): the values it reads from our file, and the values we read from its file, are
    the original ones bit for bit."""
    import safetensors.torch
    import torch

    x = np.random.RandomState(1).randn(4, 6).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "bf.safetensors", [("x", x)])
    back = SafetensorsFile(tmp_path / "bf.safetensors").get("x")
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.view(np.uint16), x.view(np.uint16))

    theirs = safetensors.torch.load_file(tmp_path / "bf.safetensors")["x"]
    assert theirs.dtype == torch.bfloat16 and tuple(theirs.shape) == x.shape
    np.testing.assert_array_equal(theirs.float().numpy(), x.astype(np.float32))
    safetensors.torch.save_file({"y": torch.from_numpy(x.astype(np.float32)).bfloat16()},
                                tmp_path / "torch.safetensors")
    ours = SafetensorsFile(tmp_path / "torch.safetensors").get("y")
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.view(np.uint16), x.view(np.uint16))
