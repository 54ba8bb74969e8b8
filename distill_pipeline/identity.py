"""Content identity of a model directory: what determines the teacher's log-probs, nothing else.

`content_identity(model_dir)` is a sha256 (64 hex chars) over a canonical JSON payload of
per-input digests:

- **weights** — the sorted list of sha256 digests of the weight files' bytes. The files are the
  shards listed by `model.safetensors.index.json` when there is one, else every top-level
  `*.safetensors` except `consolidated*.safetensors` (Mistral's duplicate in its own format);
  without safetensors, `pytorch_model*.bin` the same way (with `pytorch_model.bin.index.json`).
  Sorted digests, so shard *names* do not count; a safetensors header holds its tensor names, dtypes
  and shapes, so the multiset of shard digests fixes every (name, tensor) pair. Files under
  `original/` (duplicate weights) are never read. A file's sha256 is what the Hugging Face cache
  names an LFS blob, so a hub snapshot and a plain copy of it get the same identity.
- **adapter_config.json** (a LoRA adapter directory, whose weights are `adapter_model.safetensors`)
  — parsed, minus `ADAPTER_CONFIG_IGNORED` (the base's location, peft's bookkeeping): an adapter
  directory's content identity is the adapter's alone; `models.teacher_identity` combines it with
  its base's.
- **config.json** — parsed, minus the keys in `CONFIG_IGNORED` (metadata and runtime switches that
  do not change the forward pass: `_name_or_path`, `transformers_version`, `use_cache`, …), then
  canonical JSON (sorted keys), so formatting does not count either. `torch_dtype` / `dtype`
  *stay in* (normalised to one `dtype` key, as transformers ≥ 4.56 renamed it): the extraction
  loads checkpoints with `dtype="auto"`, which computes in the config's dtype, not necessarily the
  stored one, so it changes the log-probs.
- **tokenizer** — `tokenizer.json` (canonical JSON), the vocabulary files (`tokenizer.model`,
  `vocab.json`, `vocab.txt`, `merges.txt`, `*.tiktoken`: bytes), `special_tokens_map.json` and
  `added_tokens.json` (canonical JSON), `tokenizer_config.json` minus `TOKENIZER_CONFIG_IGNORED`
  (canonical JSON; its `chat_template` entry, when there is one, stays in).
- **chat template** — `chat_template.jinja`, `chat_template.json`,
  `additional_chat_templates/*.jinja` (bytes; the name of an additional template counts, it is how
  one is selected), plus the `tokenizer_config.json` entry above.

Each input is listed under its role (`config.json`, `tokenizer.json`, …: names transformers fixes,
not free file names). Not inputs: README and other files, `generation_config.json` (decoding
defaults, not log-probs), `original/`, the memo file, file names of weights, the directory path.

Memo: a local directory's per-input digests are kept in `MEMO_NAME` inside it, each with the
file's (size, mtime_ns, ctime_ns). Every call lists the inputs again and stats each one (a few
stat calls), reusing a digest only when all three match; anything else — a changed file, an input
that appeared, a memo of another version, an unreadable memo — is hashed again, so the memo is
never trusted blindly. ctime cannot be set from user space (`os.utime` sets it to *now*), so a
same-size rewrite with the old mtime restored is still caught; a copy of the directory (new
ctimes) is hashed once in its new place. A file modified within `RACY_NS` before its digest was
taken is not memoised (a change in the same clock tick would be invisible), so it is read again on
the next call. Not writable ⇒ the memo stays in memory (per process).

Hugging Face cache snapshot (files are symlinks into `../../blobs/<name>`): a weight file whose
blob name is a 64-hex sha256 (an LFS object: its name *is* the sha256 of its content) is taken by
name, without reading the weights; small files are read. Nothing is written into the hub cache;
digests are memoised in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

IDENTITY_VERSION = 1
MEMO_NAME = ".distill-identity.json"

CONFIG_IGNORED = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation_autoset", "torchscript", "use_return_dict",
})
TOKENIZER_CONFIG_IGNORED = frozenset({
    "name_or_path", "_name_or_path", "_commit_hash", "tokenizer_file", "transformers_version",
})
# A LoRA adapter's config: where its base lives is a location, not content (the base's own identity
# is combined with the adapter's by `models.teacher_identity`); peft's bookkeeping neither.
ADAPTER_CONFIG_IGNORED = frozenset({"base_model_name_or_path", "revision", "inference_mode",
                                    "peft_version", "auto_mapping"})
_JSON_INPUTS = {"config.json": CONFIG_IGNORED, "adapter_config.json": ADAPTER_CONFIG_IGNORED,
                "tokenizer.json": frozenset(),
                "tokenizer_config.json": TOKENIZER_CONFIG_IGNORED,
                "special_tokens_map.json": frozenset(), "added_tokens.json": frozenset(),
                "chat_template.json": frozenset()}
_BYTE_INPUTS = {"tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja"}
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 22
# File timestamps come from a coarse clock (one tick: 1-10 ms). A file whose ctime is this close to
# the moment its digest was taken could change again within the same tick unseen ("racily
# clean", as git calls it): its digest is used but not memoised, so the next call reads it again.
RACY_NS = 50_000_000

_memory: dict[str, dict[str, dict]] = {}  # resolved dir → memo entries (all kinds of directory)
_lock = threading.Lock()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (also the dataset-file digest of `data/`)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _weight_names(d: Path, names: set[str]) -> list[str]:
    """The weight files transformers would load, relative to d (top level only)."""
    for index, suffix in (("model.safetensors.index.json", ".safetensors"),
                          ("pytorch_model.bin.index.json", ".bin")):
        if index in names:
            try:
                wm = json.loads((d / index).read_text(encoding="utf-8")).get("weight_map") or {}
                return sorted(set(wm.values()))
            except (OSError, ValueError, AttributeError):
                pass  # damaged index: fall back to the files themselves
        st = sorted(n for n in names if n.endswith(suffix) and not n.startswith("consolidated")
                    and (suffix == ".safetensors" or n.startswith(("pytorch_model", "adapter_model"))))
        if st:
            return st
    return []


def _inputs(d: Path) -> dict[str, str]:
    """relative path → kind ('weight', 'json', 'bytes') of every file that goes into the hash."""
    try:
        names = {e.name for e in os.scandir(d) if e.is_file()}  # follows symlinks (hub cache)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such model directory: {d}") from None
    found = {n: "weight" for n in _weight_names(d, names) if n in names}
    found.update({n: "json" for n in _JSON_INPUTS if n in names})
    found.update({n: "bytes" for n in names if n in _BYTE_INPUTS or n.endswith(".tiktoken")})
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        found.update({f"additional_chat_templates/{e.name}": "bytes" for e in os.scandir(extra)
                      if e.is_file() and e.name.endswith(".jinja")})
    return found


def _hub_blob(path: Path) -> Path | None:
    """The blob a hub-cache snapshot file links to, or None for an ordinary file."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if target.parent.name == "blobs" else None


def _digest(path: Path, rel: str, kind: str) -> str:
    if kind == "weight":
        blob = _hub_blob(path)
        if blob is not None and _SHA256_NAME.fullmatch(blob.name):
            return blob.name  # LFS object: named by the sha256 of its content
        return sha256_file(path)
    if kind == "json":
        try:
            data = json.loads(path.read_bytes())
        except ValueError:  # unparsable: its bytes are its identity (loading fails loudly anyway)
            return sha256_file(path)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _JSON_INPUTS[rel]}
            if rel == "adapter_config.json":  # peft writes these sets in hash-seed order
                for name in ("target_modules", "modules_to_save", "exclude_modules"):
                    if isinstance(data.get(name), list):
                        data[name] = sorted(data[name], key=str)
            if rel == "config.json" and "torch_dtype" in data:  # renamed `dtype` in 4.56
                data.setdefault("dtype", data["torch_dtype"])
                del data["torch_dtype"]
        return hashlib.sha256(_canonical(data)).hexdigest()
    return sha256_file(path)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_memo(memo: Path) -> dict[str, dict]:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != IDENTITY_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_memo(memo: Path, files: dict[str, dict]) -> bool:
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": IDENTITY_VERSION, "files": files}, indent=1,
                                  sort_keys=True), encoding="utf-8")
        os.replace(tmp, memo)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def _payload(digests: dict[str, tuple[str, str]]) -> bytes:
    """digests: rel → (kind, digest). Weights by content only; other inputs by role."""
    weights = sorted(dg for kind, dg in digests.values() if kind == "weight")
    other = {rel: dg for rel, (kind, dg) in digests.items() if kind != "weight"}
    return _canonical({"identity_version": IDENTITY_VERSION, "weights": weights, "files": other})


def compute_identity(model_dir: Path) -> str:
    """The content identity, every input read (or taken from hub blob names); no memo."""
    d = Path(model_dir)
    digests = {rel: (kind, _digest(d / rel, rel, kind)) for rel, kind in _inputs(d).items()}
    return hashlib.sha256(_payload(digests)).hexdigest()


def content_identity(model_dir: Path) -> str:
    """The content identity, memoised against (size, mtime_ns, ctime_ns) of every input and
    re-validated on every call (see the module docstring)."""
    d = Path(model_dir)
    key = str(d.resolve())
    inputs = _inputs(d)
    stats = {rel: _stat_key((d / rel).stat()) for rel in inputs}  # follows hub symlinks
    hub = any(_hub_blob(d / rel) is not None for rel in inputs)
    memo_file = d / MEMO_NAME
    with _lock:
        known = dict(_memory.get(key, {}))
    if not hub and not known:
        known = _read_memo(memo_file)
    fresh: dict[str, dict] = {}
    changed = False
    for rel, kind in inputs.items():
        old = known.get(rel)
        if (isinstance(old, dict) and old.get("stat") == stats[rel] and old.get("kind") == kind
                and isinstance(old.get("digest"), str)):
            fresh[rel] = old
            continue
        digest = _digest(d / rel, rel, kind)
        st = _stat_key((d / rel).stat())
        if st != stats[rel] or max(st[1], st[2]) >= time.time_ns() - RACY_NS:
            st = [-1, -1, -1]  # changed while read, or racily clean: do not memoise
        fresh[rel] = {"kind": kind, "stat": st, "digest": digest}
        changed = True
    if set(known) != set(fresh):
        changed = True
    if changed and not hub:
        _write_memo(memo_file, fresh)  # best effort: read-only ⇒ memory only
    with _lock:
        _memory[key] = fresh
    return hashlib.sha256(_payload({rel: (e["kind"], e["digest"])
                                    for rel, e in fresh.items()})).hexdigest()


def forget(model_dir: Path | None = None) -> None:
    """Drop the in-memory memo (of one directory, or all); the memo files stay."""
    with _lock:
        if model_dir is None:
            _memory.clear()
        else:
            _memory.pop(str(Path(model_dir).resolve()), None)
