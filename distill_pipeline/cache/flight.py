"""The cache service's wire format (Arrow Flight) and its client, `FlightRemote`.

The server is `service.py`; this module is all a client loads (`open_store("grpc://…")`).

Wire formats (all JSON is UTF-8):
- actions (`do_action`): `segments` → JSON list of committed segment names; `commit` (body: a
  segment name) → its commit record; `commits` (body: JSON list of ≤ MAX_RECORD_NAMES segment
  names) → {name: commit record} of those committed; `has` (body: JSON list of keys, ≤ MAX_HAS_KEYS) → JSON list of
  those present; `stats` → {"segments", "entries"}; `remove` (write; body: a segment name) →
  {"removed": bool}.
- tickets (`do_get`), JSON objects: {"kind": "index"} → the consolidated index (KEY_COLUMNS +
  segment, as `Store.index_table`); {"kind": "segment", "name": N} → FILE_SCHEMA rows, every file
  of N in order of path, cut into parts of ≤ PART_BYTES; {"kind": "entries", "keys": [...]}
  (≤ MAX_TICKET_KEYS) → ENTRY_SCHEMA rows, one per key present (absent keys are left out);
  {"kind": "rows", "keys": [...]} (≤ MAX_TICKET_KEYS) → the index rows of those keys, as
  `Store.lookup` (the index partitions they fall in are read, not the whole index).
- uploads (`do_put`): descriptor path [b"segment", name], FILE_SCHEMA batches (parts of a file
  consecutive, numbered from 0, each batch ≤ MAX_MESSAGE_BYTES); the server verifies everything
  (`Store.import_segment`) and answers one metadata message {"published": bool} (false: it was
  already there). Nothing is published unless all of it verifies. At most `--max-concurrent-uploads`
  uploads are received at once; one beyond that waits up to `--upload-wait-s` for a slot, then is
  refused before anything of it is read: FlightUnavailableError with `extra_info` b"busy" (retry
  later: `FlightRemote.put_segment` does, with backoff).
Streams are sent as they are produced (a segment file by file, each checked against its commit
record before it is sent; entries in batches of ≤ PART_BYTES): a failure mid-stream ends it with an
error, and a client never uses a partial answer.
Errors come back as Flight errors whose message says what to do; `extra_info` carries b"not_found",
b"rejected" (an upload failed verification) or b"busy" (the upload limit: retryable) so the client
raises the matching CacheError.
Clients send `DISTILL_CACHE_TOKEN` as `authorization: Bearer <token>` (and trust
`DISTILL_CACHE_TLS_CA` for a self-signed grpc+tls server).
"""
from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from distill_pipeline.cache.index import empty_rows
from distill_pipeline.cache.segment import (CacheError, SegmentRejected, check_against_record,
                                            validate_segment_file, validate_segment_name)

PART_BYTES = 4 << 20                       # one file part: no message is much over 4 MiB
MAX_MESSAGE_BYTES = PART_BYTES + (256 << 10)  # a batch of parts, with its paths and offsets
DEFAULT_MAX_SEGMENT_BYTES = 1 << 30        # an upload (a segment is ~16k tokens: tens of MB)
MAX_FILES = 65536                          # files in one segment (4 arrays × chunks + 6)
MAX_TICKET_KEYS = 4096                     # keys in one entries ticket (the client splits)
MAX_HAS_KEYS = 100_000                     # keys in one `has` action
MAX_RECORD_NAMES = 256                     # segments in one `commits` action (the client splits)
DEFAULT_MAX_CONCURRENT_UPLOADS = 4         # uploads received at once (each held whole until verified)
DEFAULT_UPLOAD_WAIT_S = 10.0               # how long an upload beyond that waits for a slot
BUSY = b"busy"                             # extra_info of the refusal of an upload beyond the limit
TOKEN_ENV = "DISTILL_CACHE_TOKEN"
TLS_CA_ENV = "DISTILL_CACHE_TLS_CA"

FILE_SCHEMA = pa.schema([("path", pa.string()), ("part", pa.int32()), ("data", pa.binary())])
ENTRY_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("prompt_len", pa.int32()),
    ("top_k", pa.int32()),
    ("ids", pa.list_(pa.int32())),           # n × top_k, row-major (reshape to (n, top_k))
    ("logp", pa.list_(pa.float32())),        # n × top_k decoded log-probs, row-major
    ("lse", pa.list_(pa.float32())),         # n
    ("label_logp", pa.list_(pa.float32())),  # n
])
ACTIONS = {
    "segments": "JSON list of committed segment names",
    "commit": "body: segment name → its commit record (JSON)",
    "commits": f"body: JSON list of ≤ {MAX_RECORD_NAMES} segment names → {{name: commit record}} of those committed",
    "has": "body: JSON list of keys → JSON list of those present",
    "stats": "JSON {segments, entries}",
    "remove": "body: segment name → remove it (write token)",
}


class ServiceBusy(CacheError):
    """The cache service refused an upload because it was receiving as many as it takes at once
    (its --max-concurrent-uploads) for longer than it lets one wait; nothing of it was read, and
    sending it again later can succeed."""


# ---------------------------------------------------------------------------- wire helpers

def file_batches(files: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
                 part_bytes: int = PART_BYTES) -> Iterator[pa.RecordBatch]:
    """A segment's files as FILE_SCHEMA batches: each file cut into parts of ≤ `part_bytes`
    (an empty file is one empty part), parts grouped so a batch carries ≤ `part_bytes` of data.
    `files`: {path: bytes} (sent in order of path), or (path, bytes) pairs in the order to send,
    read one at a time (so a stream holds one file, not the segment)."""
    rows: list[tuple[str, int, bytes]] = []
    held = 0
    pairs = ((rel, files[rel]) for rel in sorted(files)) if isinstance(files, Mapping) else files
    for rel, data in pairs:
        data = bytes(data)
        parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
        for i, part in enumerate(parts):
            if rows and held + len(part) > part_bytes:
                batch, rows, held = _batch(rows), [], 0  # the parts are let go before the batch is sent
                yield batch
            rows.append((rel, i, part))
            held += len(part)
    if rows:
        yield _batch(rows)


def _batch(rows: list[tuple[str, int, bytes]]) -> pa.RecordBatch:
    paths, parts, data = zip(*rows)
    return pa.record_batch([pa.array(paths, pa.string()), pa.array(parts, pa.int32()),
                            pa.array(data, pa.binary())], schema=FILE_SCHEMA)


def assemble_files(batches: Iterable[pa.RecordBatch], name: str, *, max_bytes: int, max_files: int,
                   max_message: int = MAX_MESSAGE_BYTES, stop: Callable[[], bool] | None = None
                   ) -> tuple[dict[str, bytes], int]:
    """FILE_SCHEMA batches → ({path: bytes}, total bytes), refusing (SegmentRejected) as soon as
    something is wrong: another schema, nulls, a file name a segment never holds (`../x`), parts
    missing, repeated or out of order, a message over `max_message`, more than `max_files` files
    or `max_bytes` bytes — so a hostile or broken stream costs at most the bound in memory. Each
    file grows in one buffer, so the segment is held about once (not as parts and then joined)."""
    parts: dict[str, bytearray] = {}
    counts: dict[str, int] = {}
    total = 0
    for batch in batches:
        if stop is not None and stop():
            raise fl.FlightUnavailableError("the cache service is shutting down; upload again when it is back")
        if not batch.schema.equals(FILE_SCHEMA):
            raise SegmentRejected(f"segment {name}: batches must have the schema path: string, part: int32, "
                                  f"data: binary, not {batch.schema.to_string(show_schema_metadata=False)!r}")
        if batch.nbytes > max_message:
            raise SegmentRejected(f"segment {name}: a message of {batch.nbytes} bytes is over the limit of "
                                  f"{max_message}; cut files into parts of ≤ {PART_BYTES} bytes")
        if any(col.null_count for col in batch.columns):
            raise SegmentRejected(f"segment {name}: null path, part or data in the stream")
        for rel, part, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                                   batch.column(2).to_pylist()):
            validate_segment_file(rel)
            have = parts.setdefault(rel, bytearray())
            expected = counts.get(rel, 0)
            if part != expected:
                raise SegmentRejected(f"segment {name}: {rel} part {part} arrived where part {expected} "
                                      "was expected (parts must be consecutive, from 0)")
            if len(parts) > max_files:
                raise SegmentRejected(f"segment {name} has more than {max_files} files")
            total += len(data)
            if total > max_bytes:
                raise SegmentRejected(f"segment {name} is over the limit of {max_bytes} bytes (the "
                                      "server's --max-segment-bytes)")
            have += data
            counts[rel] = part + 1
    files = {}
    for rel in list(parts):  # one file's buffer is freed as its bytes are made
        files[rel] = bytes(parts.pop(rel))
    return files, total


def record_batches(reader) -> Iterator[pa.RecordBatch]:
    """The record batches of a Flight stream (an upload's reader or a do_get's), as they come."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:
            yield chunk.data


def entry_batch(rows: list[tuple[str, dict]]) -> pa.RecordBatch:
    """(key, CacheReader.get(key)) rows as one ENTRY_SCHEMA batch."""
    def lists(field: str, dtype) -> pa.Array:
        arrays = [np.ascontiguousarray(e[field], dtype=dtype).reshape(-1) for _, e in rows]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    return pa.record_batch([
        pa.array([k for k, _ in rows], pa.string()),
        pa.array([int(e["prompt_len"]) for _, e in rows], pa.int32()),
        pa.array([int(e["ids"].shape[1]) for _, e in rows], pa.int32()),
        lists("ids", np.int32), lists("logp", np.float32), lists("lse", np.float32),
        lists("label_logp", np.float32)], schema=ENTRY_SCHEMA)


# ---------------------------------------------------------------------------- client

class FlightRemote:
    """The cache service as a `Remote` (remote.py): what `MirroredStore` and `cache push/pull` use.
    Sends `DISTILL_CACHE_TOKEN` (or `token`) on every call; every failure is a CacheError saying
    what to check (SegmentRejected when the service refused an upload or sent a damaged segment).
    An upload refused because the service is at its upload limit is sent again after a backoff
    (`busy_backoff_s`, doubling to at most 8 s, ±50% jitter), at most `busy_retries` times; then
    it is a ServiceBusy."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float | None = 600.0,
                 busy_retries: int = 6, busy_backoff_s: float = 0.5):
        if not url.startswith(("grpc://", "grpc+tls://")):
            raise CacheError(f"{url} is not a cache service URL; use grpc://host:port or grpc+tls://host:port")
        self.url = url.rstrip("/")
        token = (os.environ.get(TOKEN_ENV, "") if token is None else token).strip()
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        kwargs = {}
        ca = os.environ.get(TLS_CA_ENV)
        if ca and self.url.startswith("grpc+tls://"):
            try:
                kwargs["tls_root_certs"] = Path(ca).read_bytes()
            except OSError as exc:
                raise CacheError(f"cannot read {TLS_CA_ENV}={ca}: {exc.strerror}") from None
        try:
            self._client = fl.FlightClient(self.url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid for an unparsable URL
            raise CacheError(f"{self.url} is not a usable cache service URL ({exc}); use "
                             "grpc://host:port or grpc+tls://host:port") from None
        self._options = fl.FlightCallOptions(headers=headers, timeout=timeout)
        self.busy_retries, self.busy_backoff_s = max(0, int(busy_retries)), float(busy_backoff_s)

    def __repr__(self) -> str:
        return f"FlightRemote({self.url!r})"

    def _fail(self, exc: Exception, what: str) -> CacheError:
        msg = str(exc).split(". Detail:")[0].split(". gRPC client debug context")[0].strip()
        if isinstance(exc, fl.FlightError) and getattr(exc, "extra_info", b"") == BUSY:
            return ServiceBusy(f"the cache service at {self.url} refused to {what}: {msg}")
        if isinstance(exc, fl.FlightUnavailableError):
            msg = msg.split("with message: ", 1)[-1]
            return CacheError(f"cannot reach the cache service at {self.url} ({msg[:200]}); check that "
                              "`distill-pipeline cache serve` runs there, the host and port, and grpc:// "
                              "vs grpc+tls:// (the server prints the URL it serves at)")
        if isinstance(exc, fl.FlightTimedOutError):
            return CacheError(f"the cache service at {self.url} did not answer in time ({what}); check "
                              "that it is not overloaded, then try again")
        if isinstance(exc, (fl.FlightUnauthenticatedError, fl.FlightUnauthorizedError)):
            return CacheError(f"the cache service at {self.url} refused to {what}: {msg}")
        if isinstance(exc, fl.FlightError) and getattr(exc, "extra_info", b"") == b"rejected":
            return SegmentRejected(f"{self.url}: {msg}")
        return CacheError(f"the cache service at {self.url} could not {what}: {msg}")

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except CacheError:
            raise
        except (fl.FlightError, pa.ArrowException) as exc:
            raise self._fail(exc, what) from None

    def _action(self, kind: str, body: bytes = b"", what: str = "") -> Any:
        with self._call(what or kind):
            results = list(self._client.do_action(fl.Action(kind, body), self._options))
        return json.loads(results[0].body.to_pybytes())

    def _stream(self, ticket: dict, what: str) -> Iterator[pa.RecordBatch]:
        with self._call(what):
            reader = self._client.do_get(fl.Ticket(json.dumps(ticket).encode()), self._options)
            yield from record_batches(reader)

    # ------------------------------------------------------------------ Remote
    def segment_names(self) -> list[str]:
        return self._action("segments", what="list segments")

    def commit_record(self, name: str) -> dict:
        return self._action("commit", validate_segment_name(name).encode(), f"give the record of segment {name}")

    def index_table(self) -> pa.Table:
        with self._call("send its key index"):
            return self._client.do_get(fl.Ticket(b'{"kind": "index"}'), self._options).read_all()

    def commit_records(self, names: Iterable[str]) -> dict[str, dict]:
        names = [validate_segment_name(n) for n in names]
        out: dict[str, dict] = {}
        for i in range(0, len(names), MAX_RECORD_NAMES):
            out.update(self._action("commits", json.dumps(names[i:i + MAX_RECORD_NAMES]).encode(),
                                    "give commit records"))
        return out

    def get_segment(self, name: str) -> dict[str, bytes]:
        record = self.commit_record(name)
        listed = record.get("files") or {}
        files, _ = assemble_files(self._stream({"kind": "segment", "name": name}, f"send segment {name}"),
                                  name, max_bytes=sum(int(m["size"]) for m in listed.values()),
                                  max_files=max(1, len(listed)))
        check_against_record(name, files, record, self.url)
        return files

    def put_segment(self, name: str, files: dict[str, bytes]) -> bool:
        """Upload a segment; False if the service already had it. A refusal because the service is
        at its upload limit is retried with backoff (see the class); other failures are not."""
        validate_segment_name(name)
        for rel in files:
            validate_segment_file(rel)
        if name in self.segment_names():
            return False
        t0 = time.monotonic()
        for attempt in range(self.busy_retries + 1):
            try:
                return self._put_once(name, files)
            except ServiceBusy as exc:
                if attempt == self.busy_retries:
                    waited = time.monotonic() - t0
                    raise ServiceBusy(f"{exc} — refused {attempt + 1} time(s) over {waited:.0f} s; "
                                      "nothing was published: upload again later (e.g. rerun the push or the "
                                      "extraction), or ask the operator to raise --max-concurrent-uploads "
                                      "or --upload-wait-s") from None
                delay = min(8.0, self.busy_backoff_s * 2 ** attempt)
                time.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _put_once(self, name: str, files: dict[str, bytes]) -> bool:
        with self._call(f"take segment {name}"):
            writer, answers = self._client.do_put(fl.FlightDescriptor.for_path("segment", name),
                                                  FILE_SCHEMA, self._options)
            try:
                for batch in file_batches(files):
                    writer.write_batch(batch)
                writer.done_writing()
                answer = answers.read()
            except BaseException:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the same refusal again: the first one is reported
                    pass
                raise
            writer.close()
        if answer is None:
            raise CacheError(f"the cache service at {self.url} did not say whether segment {name} was "
                             "published; list its segments to check")
        return bool(json.loads(answer.to_pybytes())["published"])

    def remove_segment(self, name: str) -> None:
        self._action("remove", validate_segment_name(name).encode(), f"remove segment {name}")

    def lookup(self, keys: Iterable[str]) -> pa.Table:
        """The index rows of `keys` (`rows` tickets of ≤ MAX_TICKET_KEYS keys: the service reads
        only the index partitions they fall in)."""
        keys = sorted(set(keys))
        parts = []
        for i in range(0, len(keys), MAX_TICKET_KEYS):
            with self._call("look up keys"):
                ticket = fl.Ticket(json.dumps({"kind": "rows", "keys": keys[i:i + MAX_TICKET_KEYS]}).encode())
                parts.append(self._client.do_get(ticket, self._options).read_all())
        found = [p for p in parts if p.num_rows]  # (an empty answer may come with string columns)
        return pa.concat_tables(found) if found else parts[0] if parts else empty_rows()

    def has(self, keys: Iterable[str]) -> set[str]:
        """The keys the service holds (it looks them up in its own index)."""
        keys, out = list(keys), set()
        for i in range(0, len(keys), MAX_HAS_KEYS):
            out.update(self._action("has", json.dumps(keys[i:i + MAX_HAS_KEYS]).encode(), "look up keys"))
        return out

    def uncommitted(self) -> None:
        """None: the service writes uploads under its store's tmp/ and renames them into place;
        `cache gc --store <its store>` on the server removes abandoned ones."""
        return None

    # ------------------------------------------------------------------ more than a Remote

    def stats(self) -> dict:
        return self._action("stats", what="give its statistics")

    def entries(self, keys: Iterable[str]) -> dict[str, dict]:
        """key → {"ids" (n, K) int32, "logp" (n, K) float32, "lse" (n,), "label_logp" (n,),
        "k" (n,), "prompt_len"}, as `CacheReader.get` (adaptive K: rows padded with −inf slots,
        `k` counts the others); keys the service does not hold are left out."""
        keys, out = list(dict.fromkeys(keys)), {}
        for i in range(0, len(keys), MAX_TICKET_KEYS):
            for batch in self._stream({"kind": "entries", "keys": keys[i:i + MAX_TICKET_KEYS]}, "send entries"):
                if not batch.schema.equals(ENTRY_SCHEMA):
                    raise CacheError(f"the cache service at {self.url} sent entries in another schema; "
                                     "check that client and server run the same distill-pipeline version")
                cols = {f: batch.column(f) for f in ENTRY_SCHEMA.names}
                for r, key in enumerate(cols["key"].to_pylist()):
                    k = max(1, cols["top_k"][r].as_py())
                    row = {f: np.asarray(cols[f][r].values.to_numpy(zero_copy_only=False))
                           for f in ("ids", "logp", "lse", "label_logp")}
                    logp = row["logp"].reshape(-1, k)
                    out[key] = {"ids": row["ids"].reshape(-1, k), "logp": logp,
                                "lse": row["lse"], "label_logp": row["label_logp"],
                                "k": (logp > -np.inf).sum(1).astype(np.int64),
                                "prompt_len": cols["prompt_len"][r].as_py()}
        return out
