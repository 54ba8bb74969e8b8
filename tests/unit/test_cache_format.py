"""Cache formats: lossless views of the stored dtype, the lossy keep-n-mantissa-bits mode, keys."""
from __future__ import annotations

import numpy as np
import pytest

from distill_pipeline.cache.format import CacheFormat, FormatError, reconstruction_kl
from distill_pipeline.config import TeacherLogits


def sorted_logp(n=64, k=50, seed=0):
    g = np.random.default_rng(seed)
    lp = np.log(g.dirichlet(np.ones(200) * 0.1, size=n).astype(np.float32) + 1e-12)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


@pytest.mark.parametrize("dtype, np_dtype", [("float16", np.float16), ("float32", np.float32)])
def test_lossless_codes_are_exact_views(dtype, np_dtype):
    lp = sorted_logp()
    fmt = CacheFormat(50, dtype)
    np.testing.assert_array_equal(fmt.decode(fmt.encode(lp)), lp.astype(np_dtype).astype(np.float32))


def test_bfloat16_round_trip_matches_torch():
    import torch
    lp = sorted_logp()
    fmt = CacheFormat(50, "bfloat16")
    np.testing.assert_array_equal(fmt.decode(fmt.encode(lp)), torch.from_numpy(lp).to(torch.bfloat16).float().numpy())


def test_keep_bits_rounds_to_nearest_and_reports_kl():
    lp = sorted_logp()
    exact = lp.astype(np.float16).astype(np.float32)
    kls = []
    for keep in (None, 6, 4, 2):
        fmt = CacheFormat(50, "float16", keep)
        back = fmt.decode(fmt.encode(lp))
        rel = np.abs(back - exact) / np.maximum(np.abs(exact), 1e-3)
        assert rel.max() <= 2.0 ** -((keep or 10) + 1) + 1e-3  # half an ulp at `keep` mantissa bits
        kls.append(reconstruction_kl(lp, back))
    assert CacheFormat(50).storage == "float16" and CacheFormat(50, "float16", 4).storage == "float16-keep4"
    assert kls == sorted(kls) and kls[-1] > kls[0]  # fewer bits, more loss


def test_every_format_field_is_part_of_the_key_and_validated():
    keys = {CacheFormat(*f).key("t", [1, 2], 1) for f in
            [(50, "float16"), (50, "float16", 4), (20, "float16"), (50, "bfloat16"), (50, "float32")]}
    assert len(keys) == 5
    assert CacheFormat(50).key("t", [1, 2], 1) != CacheFormat(50).key("t", [1, 2], 2)  # prompt length
    assert CacheFormat.from_json(CacheFormat(8, "bfloat16", 3).to_json()) == CacheFormat(8, "bfloat16", 3)
    with pytest.raises(FormatError, match="unknown log-prob storage dtype"):
        CacheFormat(50, "int8")
    with pytest.raises(ValueError, match="below the 10 mantissa bits of float16"):
        TeacherLogits(logp_keep_bits=10)
    assert TeacherLogits(logp_keep_bits=4).format == CacheFormat(50, "float16", 4)
