"""Storage codes: lossless views of the stored dtype, and the lossy keep-n-mantissa-bits mode."""
from __future__ import annotations

import numpy as np
import pytest

from distill_pipeline.cache.store import (CacheError, entry_key, from_bits, parse_code,
                                          reconstruction_kl, storage_code, to_bits)
from distill_pipeline.pipeline.config import TeacherLogits


def sorted_logp(n=64, k=50, seed=0):
    g = np.random.default_rng(seed)
    lp = np.log(g.dirichlet(np.ones(200) * 0.1, size=n).astype(np.float32) + 1e-12)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


@pytest.mark.parametrize("dtype, np_dtype", [("float16", np.float16), ("float32", np.float32)])
def test_lossless_codes_are_exact_views(dtype, np_dtype):
    lp = sorted_logp()
    back = from_bits(to_bits(lp, dtype), dtype)
    np.testing.assert_array_equal(back, lp.astype(np_dtype).astype(np.float32))


def test_bfloat16_round_trip_matches_torch():
    import torch
    lp = sorted_logp()
    back = from_bits(to_bits(lp, "bfloat16"), "bfloat16")
    np.testing.assert_array_equal(back, torch.from_numpy(lp).to(torch.bfloat16).float().numpy())


def test_keep_bits_rounds_to_nearest_and_reports_kl():
    lp = sorted_logp()
    exact = lp.astype(np.float16).astype(np.float32)
    kls = []
    for keep in (10, 6, 4, 2):
        code = storage_code("float16", keep)
        back = from_bits(to_bits(lp, code), code)
        rel = np.abs(back - exact) / np.maximum(np.abs(exact), 1e-3)
        assert rel.max() <= 2.0 ** -(keep + 1) + 1e-3  # half an ulp at `keep` mantissa bits
        kls.append(reconstruction_kl(lp, back))
    assert storage_code("float16", 10) == "float16" and parse_code("float16-keep4") == ("float16", 4)
    assert kls == sorted(kls) and kls[-1] > kls[0]  # fewer bits, more loss


def test_lossy_code_is_part_of_the_key_and_validated():
    assert entry_key("t", [1, 2], 1, 50, "float16") != entry_key("t", [1, 2], 1, 50, "float16-keep4")
    with pytest.raises(CacheError, match="unknown log-prob storage"):
        parse_code("int8")
    with pytest.raises(ValueError, match="below the 10 mantissa bits of float16"):
        TeacherLogits(logp_keep_bits=10)
    assert TeacherLogits(logp_keep_bits=4).logp_keep_bits == 4
