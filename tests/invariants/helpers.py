"""Shared by the cache invariant tests: a tiny teacher checkpoint and extraction requests.
Also runnable as a script (the crash test kills it with SIGKILL mid-extraction):
    python -m tests.invariants.helpers <teacher_dir> <store> <n_sequences> <unit_tokens>
"""
from __future__ import annotations

import sys
from pathlib import Path

from distill_pipeline.cache.format import CacheFormat  # noqa: E402

TOP_K, DTYPE = 8, "float16"
FMT = CacheFormat(TOP_K, DTYPE)


def make_teacher(folder: Path, seed: int = 0) -> Path:
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec

    spec = ModelSpec(preset="tiny-teacher")
    save_model(load_model(spec, seed=seed), load_tokenizer(spec), folder)
    return folder


def sequences(n: int, offset: int = 0) -> list[tuple[list[int], list[int]]]:
    """Deterministic (prompt, response) id lists of varied lengths from the numbers task."""
    from distill_pipeline.data.tokenize import encode_prompt, encode_response
    from distill_pipeline.data.toy import number_to_words
    from distill_pipeline.models import load_tokenizer
    from distill_pipeline.config import ModelSpec

    tok = load_tokenizer(ModelSpec(preset="tiny-teacher"))
    out = []
    for i in range(offset, offset + n):
        value = (i * 7919) % 100_000
        prompt = encode_prompt(tok, [{"role": "user", "content": f"digits: {number_to_words(value)}"}])
        out.append((prompt, encode_response(tok, str(value) * (1 + i % 3))))
    return out


def requests(teacher_dir: Path, seqs, fmt: CacheFormat = FMT):
    from distill_pipeline.cache.extract import make_request
    from distill_pipeline.models import teacher_identity

    ident = teacher_identity(teacher_dir)
    return [make_request(ident, p, r, fmt) for p, r in seqs], {ident: str(teacher_dir)}


def run_extraction(teacher_dir: Path, store_root: Path, n: int, unit_tokens: int, workers: int = 1,
                   offset: int = 0, fmt: CacheFormat = FMT, batch_tokens: int = 256) -> dict:
    from distill_pipeline.cache.extract import extract
    from distill_pipeline.cache.store import Store

    reqs, dirs = requests(teacher_dir, sequences(n, offset), fmt)
    return extract(reqs, Store(store_root), dirs, fmt, num_workers=workers,
                   batch_tokens=batch_tokens, unit_tokens=unit_tokens)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under segments/, by relative path: two stores are bit-identical iff equal."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "segments").rglob("*")) if p.is_file()}


if __name__ == "__main__":
    print(run_extraction(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])), flush=True)
