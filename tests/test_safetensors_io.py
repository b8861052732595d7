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
    x = np.random.RandomState(1).randn(4, 6).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "bf.safetensors", [("x", x)])
    back = SafetensorsFile(tmp_path / "bf.safetensors").get("x")
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.view(np.uint16), x.view(np.uint16))
