"""What one teacher-logit cache entry holds and how it is stored: `CacheFormat`, spelled once.

A format is (K, the dtype the top-K log-probs are stored in, and optionally how many mantissa
bits of them are kept — the lossy mode). It is part of every entry key, written once into each
segment's manifest and once into each extraction node's `teachers.json`; the train stage reads it
from the cache node it reads, never from its own config. Importing this module is cheap (no
numpy/torch at import time), so config validation can use it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

SCHEMA_VERSION = 1  # part of every key; bump only when keys or array layouts change
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}


class FormatError(ValueError):
    """A cache format that cannot exist (unknown dtype, K < 1, too many kept bits)."""


@dataclass(frozen=True)
class CacheFormat:
    top_k: int
    dtype: str = "float16"
    logp_keep_bits: int | None = None  # None: every mantissa bit of `dtype` (lossless)

    def __post_init__(self):
        if self.dtype not in MANTISSA_BITS:
            raise FormatError(f"unknown log-prob storage dtype {self.dtype!r}; expected "
                              f"{', '.join(MANTISSA_BITS)}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise FormatError(f"top_k must be a positive integer (got {self.top_k!r})")
        bits = MANTISSA_BITS[self.dtype]
        if self.logp_keep_bits is not None and not 1 <= self.logp_keep_bits < bits:
            raise FormatError(f"logp_keep_bits must be between 1 and {bits - 1}, below the {bits} "
                              f"mantissa bits of {self.dtype} (leave it unset for lossless storage)")

    @property
    def storage(self) -> str:
        """How log-probs are stored, as one token: `float16`, or `float16-keep6` in lossy mode."""
        return self.dtype if self.logp_keep_bits is None else f"{self.dtype}-keep{self.logp_keep_bits}"

    def key(self, teacher: str, token_ids: Iterable[int], prompt_len: int) -> str:
        """Content address of one entry: schema, teacher identity, format, prompt length, tokens."""
        import numpy as np

        h = hashlib.sha256(f"{SCHEMA_VERSION}|{teacher}|{self.top_k}|{self.storage}|{prompt_len}|".encode())
        h.update(np.asarray(list(token_ids), dtype="<i4").tobytes())
        return h.hexdigest()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CacheFormat":
        return cls(**data)

    @classmethod
    def from_manifest(cls, attrs: dict) -> "CacheFormat":
        """A segment's format from its manifest: the `format` object, or the separate `top_k` and
        `logp_dtype` (`float16` / `float16-keep4`) of segments written before it existed."""
        if "format" in attrs:
            return cls.from_json(attrs["format"])
        base, _, keep = attrs["logp_dtype"].partition("-keep")
        return cls(int(attrs["top_k"]), base, int(keep) if keep else None)

    # ------------------------------------------------------------------ log-prob bits

    def encode(self, logp_f32: Any):
        """float32 numpy log-probs → stored bit patterns (uint16/uint32): an exact view of
        `dtype`, with the low mantissa bits rounded to nearest in the lossy mode."""
        import numpy as np

        if self.dtype == "float32":
            bits = logp_f32.astype(np.float32).view(np.uint32)
        elif self.dtype == "float16":
            bits = logp_f32.astype(np.float16).view(np.uint16)
        else:
            import torch  # numpy has no bfloat16

            bits = (torch.from_numpy(logp_f32.astype(np.float32)).to(torch.bfloat16)
                    .view(torch.int16).numpy().view(np.uint16))
        if self.logp_keep_bits is None:
            return bits
        drop = MANTISSA_BITS[self.dtype] - self.logp_keep_bits
        wide = bits.astype(np.uint64)
        wide = ((wide + (1 << (drop - 1))) >> drop) << drop  # a carry moves the exponent: still exact
        return wide.astype(bits.dtype)

    def decode(self, bits: Any):
        """Stored bit patterns → float32 numpy log-probs."""
        import numpy as np

        if self.dtype == "float32":
            return bits.view(np.float32)
        if self.dtype == "float16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)


def reconstruction_kl(logp_f32: Any, stored_f32: Any) -> float:
    """Mean over tokens of KL(original K+1 bins ‖ stored K+1 bins): what storage loses."""
    import numpy as np

    def bins(lp):
        p = np.exp(lp.astype(np.float64))
        return np.clip(np.concatenate([p, np.clip(1 - p.sum(-1, keepdims=True), 0, None)], -1), 1e-8, 1)

    if len(logp_f32) == 0:
        return 0.0
    p, q = bins(logp_f32), bins(stored_f32)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())
