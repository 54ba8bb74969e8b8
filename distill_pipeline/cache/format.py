"""What one teacher-logit cache entry holds and how it is stored: `CacheFormat`, spelled once.

A format is (K, the dtype the top-K log-probs are stored in, optionally how many mantissa bits
of them are kept — the lossy mode — and optionally a probability mass that makes K adaptive: per
token the smallest k ≤ K whose cumulative probability reaches it, at least `min_k`). It is part of
every entry key, written once into each segment's manifest and once into each extraction node's
`teachers.json`; the train stage reads it from the cache node it reads, never from its own config.
Importing this module is cheap (no numpy/torch at import time), so config validation can use it.
A fixed-K format's keys and manifest are what they were before adaptive K existed (schema 1).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

SCHEMA_VERSION = 1  # part of every key; bump only when keys or array layouts change
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}


class FormatError(ValueError):
    """A cache format that cannot exist (unknown dtype, K < 1, too many kept bits)."""


class NewerFormat(FormatError):
    """A segment written by a newer distill-pipeline, in a format with fields this version does not
    know: not damaged — readable after an upgrade (`cache gc --damaged` leaves it alone)."""


@dataclass(frozen=True)
class CacheFormat:
    top_k: int
    dtype: str = "float16"
    logp_keep_bits: int | None = None  # None: every mantissa bit of `dtype` (lossless)
    top_mass: float | None = None  # adaptive K: keep the smallest k ≤ top_k reaching this mass
    min_k: int = 1                 # adaptive K: keep at least this many

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
        if self.top_mass is not None:
            if isinstance(self.top_mass, bool) or not isinstance(self.top_mass, (int, float)) \
                    or not 0 < self.top_mass < 1:
                raise FormatError(f"top_mass must be a probability strictly between 0 and 1, e.g. "
                                  f"0.999 (got {self.top_mass!r}); leave it unset for a fixed K")
            object.__setattr__(self, "top_mass", float(self.top_mass))
        if not isinstance(self.min_k, int) or isinstance(self.min_k, bool) or not 1 <= self.min_k <= self.top_k:
            raise FormatError(f"min_k must be an integer between 1 and top_k={self.top_k} (got {self.min_k!r})")
        if self.top_mass is None and self.min_k != 1:
            raise FormatError("min_k applies to an adaptive K only: set top_mass too (e.g. 0.999), or "
                              "leave min_k at 1")

    @property
    def adaptive(self) -> bool:
        """Per-token k (ragged storage) rather than K slots for every token."""
        return self.top_mass is not None

    @property
    def shape(self) -> str:
        """How many slots a token keeps, as one token: `50`, or `50-mass0.999-min1` (adaptive)."""
        if not self.adaptive:
            return str(self.top_k)
        return f"{self.top_k}-mass{self.top_mass!r}-min{self.min_k}"

    @property
    def label(self) -> str:
        """For people (`cache ls/info`): `50`, or `≤50 @ mass 0.999` (adaptive)."""
        if not self.adaptive:
            return str(self.top_k)
        return f"≤{self.top_k} @ mass {self.top_mass!r}" + (f", min {self.min_k}" if self.min_k > 1 else "")

    @property
    def storage(self) -> str:
        """How log-probs are stored, as one token: `float16`, or `float16-keep6` in lossy mode."""
        return self.dtype if self.logp_keep_bits is None else f"{self.dtype}-keep{self.logp_keep_bits}"

    def key(self, teacher: str, token_ids: Iterable[int], prompt_len: int) -> str:
        """Content address of one entry: schema, teacher identity, format, prompt length, tokens."""
        import numpy as np

        # `shape` is plain K for a fixed format: its keys are the ones schema 1 always computed
        h = hashlib.sha256(f"{SCHEMA_VERSION}|{teacher}|{self.shape}|{self.storage}|{prompt_len}|".encode())
        h.update(np.asarray(list(token_ids), dtype="<i4").tobytes())
        return h.hexdigest()

    def to_json(self) -> dict:
        """The adaptive fields only when set, so a fixed format's manifest is byte for byte what
        it was before they existed."""
        data = asdict(self)
        if not self.adaptive:
            del data["top_mass"], data["min_k"]
        return data

    def kept(self, stored_logp: Any):
        """Per token, how many of the top_k slots an adaptive format keeps: the smallest k whose
        cumulative probability reaches `top_mass` (all of them if none does), at least `min_k`.
        Computed from the *stored* log-probs (N, top_k), so it is as reproducible as they are
        (other batch sizes change float32 rounding, not stored float16 values). (N,) uint16."""
        import numpy as np

        if not self.adaptive:
            return np.full(len(stored_logp), self.top_k, dtype=np.uint16)
        cum = np.cumsum(np.exp(stored_logp.astype(np.float64)), axis=1)  # (N, top_k)
        k = (cum < self.top_mass).sum(axis=1) + 1
        return np.clip(k, self.min_k, self.top_k).astype(np.uint16)

    @classmethod
    def from_json(cls, data: dict) -> "CacheFormat":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise NewerFormat(f"written by a newer distill-pipeline (format fields {', '.join(unknown)} are "
                              "unknown to this version); upgrade distill-pipeline to read it")
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


def reconstruction_kl(logp_f32: Any, stored_f32: Any, kept: Any = None, vocab: int | None = None) -> float:
    """Mean over tokens of KL(original K+1 bins ‖ stored K+1 bins): what storage loses.

    Adaptive K (`kept`: per-token slots kept, `vocab`: the vocabulary size): the original is the
    float32 top-K (K+1 bins) as a fixed-K cache would keep it; the stored side keeps the first
    k values, and a dropped slot gets what an entry that names only k tokens says about it — an
    even share of the stored tail over the `vocab − k` tokens it does not name (the tail bin gets
    the rest of it). No assumption about the teacher's tail shape; the truncation's cost is
    therefore an upper-side estimate."""
    import numpy as np

    def bins(lp):
        p = np.exp(lp.astype(np.float64))
        return np.clip(np.concatenate([p, np.clip(1 - p.sum(-1, keepdims=True), 0, None)], -1), 1e-8, 1)

    if len(logp_f32) == 0:
        return 0.0
    p = bins(logp_f32)
    if kept is None:
        q = bins(stored_f32)
    else:
        n, top_k = stored_f32.shape
        if vocab is None or vocab < top_k:
            raise ValueError(f"an adaptive-K reconstruction KL needs the vocabulary size (got {vocab})")
        k = np.asarray(kept, dtype=np.int64)[:, None]  # (N, 1)
        keep = np.arange(top_k)[None, :] < k  # (N, K)
        stored = np.where(keep, np.exp(stored_f32.astype(np.float64)), 0.0)
        tail = np.clip(1 - stored.sum(-1, keepdims=True), 0, None)  # (N, 1)
        share = tail / np.maximum(vocab - k, 1)  # each token the entry does not name
        q = np.concatenate([np.where(keep, stored, share), share * (vocab - top_k)], -1)
        q = np.clip(q, 1e-30, 1)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())
