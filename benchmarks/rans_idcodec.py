"""Top-K token ids coded at their order-0 entropy: a static per-teacher frequency model + rANS.

Benchmark code, not used by the store (benchmarks/id_coding_bench.py compares it with what the
store writes; README "Ids near their entropy" says why the store does not use it).

The cache's `ids/` arrays hold, per response token, the teacher's K most probable token ids. zstd
over int32 (blosc byte-shuffle, what `store.py` writes) spends ~16.5 bits per id on a 128k
vocabulary; an order-0 entropy coder with a model of how often the teacher names each id spends
the ids' entropy plus ~0.1%. `benchmarks/id_coding_bench.py` measures this against the zstd
variants on ≥ 1M tokens.

    model = IdModel.fit(sample_ids, vocab=128_256)     # once per teacher; model.to_bytes() is stored
    blob = encode(ids, model)                          # ids: (N, K) int32 → bytes
    assert (decode(blob, N, K, model) == ids).all()    # lossless for every int32, in the model or not

The model is dense over [0, vocab): one 24-bit frequency per id plus one for ESC, every
frequency ≥ 1, so any id of the vocabulary is codable even if the sample that built the model
never saw it (costing ≤ 24 bits). Ids outside [0, vocab) — negative ones, ids near 2^31 — are
coded as ESC and their int32 values stored raw after the coded stream. A blob names its model's
digest, so decoding with another model fails loudly instead of returning wrong ids. Without a
model, `encode` fits one to the data and embeds it (self-contained, but the table then costs more
than it saves on fewer than ~1M ids over a large vocabulary).

The entropy coder is `constriction` (Rust, ANS; `pip install constriction`), imported on first use.
Frequencies are quantised here, to integers summing to exactly 2^24 (the library's default
precision), so the probabilities handed to it are exactly representable and the code is fixed by
the model bytes, not by the library's own quantisation.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

PRECISION = 24          # bits of the coder's probabilities (constriction's default)
MAX_VOCAB = (1 << PRECISION) // 2  # each frequency ≥ 1 and room for the counts themselves
MAGIC = b"IDC1"
_HEADER = struct.Struct("<4sBxxxQI16sQQ")  # magic, flags, n, k, model digest, n_escapes, ans words
_EMBEDDED = 1


class IdCodecError(ValueError):
    """A blob that cannot be decoded: truncated, another model, other (n, k)."""


@dataclass(frozen=True, eq=False)
class IdModel:
    """How often a teacher names each id: `freqs[i]` for id i in [0, vocab), `freqs[vocab]` for
    ESC (any other int32). uint32, every entry ≥ 1, summing to exactly 2^PRECISION."""
    freqs: np.ndarray  # (vocab + 1,) uint32
    digest: bytes = field(init=False)

    def __post_init__(self):
        f = np.ascontiguousarray(self.freqs, dtype="<u4")
        if f.ndim != 1 or len(f) < 2 or len(f) - 1 > MAX_VOCAB:
            raise IdCodecError(f"an id model needs 1 to {MAX_VOCAB} vocabulary frequencies + ESC (got shape {f.shape})")
        if int(f.min()) < 1 or int(f.sum(dtype=np.uint64)) != 1 << PRECISION:
            raise IdCodecError(f"id model frequencies must be ≥ 1 and sum to 2^{PRECISION}")
        object.__setattr__(self, "freqs", f)
        object.__setattr__(self, "digest", hashlib.sha256(f.tobytes()).digest()[:16])

    @property
    def vocab(self) -> int:
        return len(self.freqs) - 1

    @classmethod
    def fit(cls, ids: np.ndarray, vocab: int, *, pseudo: float = 0.5) -> "IdModel":
        """From a sample of ids: count + `pseudo` per id (and for ESC), quantised to 2^PRECISION.
        `vocab`: the teacher's vocabulary size (ids outside [0, vocab) are escapes)."""
        if not 1 <= vocab <= MAX_VOCAB:
            raise IdCodecError(f"vocab must be between 1 and {MAX_VOCAB} (got {vocab})")
        flat = np.asarray(ids).ravel()
        inside = (flat >= 0) & (flat < vocab)
        counts = np.bincount(flat[inside].astype(np.int64), minlength=vocab).astype(np.float64)
        counts = np.append(counts, float((~inside).sum())) + pseudo
        return cls(_quantise(counts))

    def to_bytes(self) -> bytes:
        """The model as stored beside a teacher's segments (zstd over the frequencies)."""
        from numcodecs import Zstd

        return MAGIC + struct.pack("<I", self.vocab) + Zstd(level=19).encode(self.freqs.tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "IdModel":
        from numcodecs import Zstd

        if len(data) < 8 or data[:4] != MAGIC:
            raise IdCodecError("not an id model (bad magic)")
        vocab = struct.unpack_from("<I", data, 4)[0]
        try:
            raw = Zstd().decode(bytes(data[8:]))
        except Exception as exc:  # noqa: BLE001 - damaged bytes
            raise IdCodecError(f"id model damaged: {exc}") from None
        freqs = np.frombuffer(raw, dtype="<u4")
        if len(freqs) != vocab + 1:
            raise IdCodecError(f"id model damaged: {len(freqs)} frequencies for vocab {vocab}")
        return cls(freqs.copy())

    def bits(self, ids: np.ndarray) -> float:
        """What `encode` spends on `ids` under this model, in bits (ESC's raw 32 bits included)."""
        sym = _symbols(np.asarray(ids).ravel(), self.vocab)
        p = self.freqs[sym].astype(np.float64) / (1 << PRECISION)
        return float(-np.log2(p).sum() + 32 * (sym == self.vocab).sum())


def _quantise(weights: np.ndarray) -> np.ndarray:
    """Non-negative weights → uint32 frequencies ≥ 1 summing to exactly 2^PRECISION."""
    total = 1 << PRECISION
    n = len(weights)
    w = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1.0 / n)
    f = np.floor(w * (total - n)).astype(np.int64) + 1
    f[int(np.argmax(f))] += total - int(f.sum())  # the rounding remainder to the likeliest symbol
    return f.astype(np.uint32)


def _symbols(flat: np.ndarray, vocab: int) -> np.ndarray:
    return np.where((flat >= 0) & (flat < vocab), flat, vocab).astype(np.int32)


def _categorical(model: IdModel):
    import constriction  # a Rust extension: its submodules are attributes, not importable modules

    return constriction.stream.model.Categorical(model.freqs.astype(np.float64) / (1 << PRECISION), perfect=False)


def encode(ids: np.ndarray, model: IdModel | None = None) -> bytes:
    """(N, K) int32 ids → bytes. Without a model, one fitted to `ids` is embedded in the blob."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise IdCodecError(f"ids must be (N, K) (got shape {ids.shape})")
    if ids.size and (ids.dtype.kind not in "iu" or ids.min() < -(1 << 31) or ids.max() >= 1 << 31):
        raise IdCodecError(f"ids must be int32 values (got {ids.dtype}, {ids.min()}..{ids.max()})")
    n, k = ids.shape
    flags, prefix = 0, b""
    if model is None:
        flat = ids.ravel()
        inside = flat[(flat >= 0) & (flat < MAX_VOCAB)]
        model = IdModel.fit(ids, vocab=int(inside.max()) + 1 if inside.size else 1, pseudo=0.0)
        flags, prefix = _EMBEDDED, model.to_bytes()
        prefix = struct.pack("<I", len(prefix)) + prefix
    flat = ids.ravel().astype(np.int64)
    sym = _symbols(flat, model.vocab)
    escapes = flat[sym == model.vocab].astype("<i4")
    words = np.zeros(0, dtype="<u4")
    if sym.size:
        import constriction

        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, _categorical(model))
        words = coder.get_compressed().astype("<u4")
    header = _HEADER.pack(MAGIC, flags, n, k, model.digest, len(escapes), len(words))
    return header + prefix + words.tobytes() + escapes.tobytes()


def decode(data: bytes, n: int, k: int, model: IdModel | None = None) -> np.ndarray:
    """bytes → (n, k) int32 ids, exactly those `encode` was given."""
    data = memoryview(data)
    if len(data) < _HEADER.size:
        raise IdCodecError(f"id blob truncated ({len(data)} bytes, header is {_HEADER.size})")
    magic, flags, bn, bk, digest, n_esc, n_words = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IdCodecError("not an id blob (bad magic)")
    if (bn, bk) != (n, k):
        raise IdCodecError(f"id blob holds ({bn}, {bk}) ids, asked for ({n}, {k})")
    pos = _HEADER.size
    if flags & _EMBEDDED:
        size = struct.unpack_from("<I", data, pos)[0]
        model = IdModel.from_bytes(bytes(data[pos + 4:pos + 4 + size]))
        pos += 4 + size
    elif model is None:
        raise IdCodecError("this id blob was coded with a teacher's id model: pass it to decode")
    if model.digest != digest:
        raise IdCodecError(f"id blob was coded with model {digest.hex()}, not {model.digest.hex()}")
    if len(data) != pos + 4 * n_words + 4 * n_esc:
        raise IdCodecError(f"id blob is {len(data)} bytes, its header says {pos + 4 * n_words + 4 * n_esc}")
    if n * k == 0:
        return np.zeros((n, k), dtype=np.int32)
    import constriction

    words = np.frombuffer(data, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
    out = constriction.stream.stack.AnsCoder(words).decode(_categorical(model), n * k).astype(np.int32)
    esc = out == model.vocab
    if int(esc.sum()) != n_esc:
        raise IdCodecError(f"id blob damaged: {int(esc.sum())} escapes decoded, header says {n_esc}")
    out[esc] = np.frombuffer(data, dtype="<i4", count=n_esc, offset=pos + 4 * n_words)
    return out.reshape(n, k)
