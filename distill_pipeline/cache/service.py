"""The cache service: one teacher-logit store shared over Arrow Flight, and its client.

    distill-pipeline cache serve --store PATH [--host H] [--port P] [--token-file F]
                                 [--read-token-file F] [--tls-cert C --tls-key K]
    python -m distill_pipeline.cache.service --store PATH ...            (the same, without Typer)

`CacheServer` serves a local `Store`; `FlightRemote` is its client, a `Remote` (remote.py), so
`open_store("grpc://host:port")` gives a `MirroredStore` over it. Writes (uploads, removals) need a
write token (`--token-file`; no file: the service takes no writes); reads need a read or write token
when `--read-token-file` is given, else they are open. Clients send `DISTILL_CACHE_TOKEN` as
`authorization: Bearer <token>` (and trust `DISTILL_CACHE_TLS_CA` for a self-signed grpc+tls server).

Wire formats (all JSON is UTF-8):
- actions (`do_action`): `segments` → JSON list of committed segment names; `commit` (body: a
  segment name) → its commit record; `has` (body: JSON list of keys, ≤ MAX_HAS_KEYS) → JSON list of
  those present; `stats` → {"segments", "entries"}; `remove` (write; body: a segment name) →
  {"removed": bool}.
- tickets (`do_get`), JSON objects: {"kind": "index"} → the consolidated index (KEY_COLUMNS +
  segment, as `Store.index_table`); {"kind": "segment", "name": N} → FILE_SCHEMA rows, every file
  of N in order of path, cut into parts of ≤ PART_BYTES; {"kind": "entries", "keys": [...]}
  (≤ MAX_TICKET_KEYS) → ENTRY_SCHEMA rows, one per key present (absent keys are left out).
- uploads (`do_put`): descriptor path [b"segment", name], FILE_SCHEMA batches (parts of a file
  consecutive, numbered from 0, each batch ≤ MAX_MESSAGE_BYTES); the server verifies everything
  (`Store.import_segment`) and answers one metadata message {"published": bool} (false: it was
  already there). Nothing is published unless all of it verifies.
Errors come back as Flight errors whose message says what to do; `extra_info` carries b"not_found"
or b"rejected" (an upload failed verification) so the client raises the matching CacheError.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from distill_pipeline.cache.store import check_against_record
from distill_pipeline.cache.store import (CacheError, SegmentRejected, Store, validate_segment_file,
                                          validate_segment_name)

PART_BYTES = 4 << 20                       # one file part: no message is much over 4 MiB
MAX_MESSAGE_BYTES = PART_BYTES + (256 << 10)  # a batch of parts, with its paths and offsets
DEFAULT_MAX_SEGMENT_BYTES = 1 << 30        # an upload (a segment is ~16k tokens: tens of MB)
MAX_FILES = 65536                          # files in one segment (4 arrays × chunks + 6)
MAX_TICKET_KEYS = 4096                     # keys in one entries ticket (the client splits)
MAX_HAS_KEYS = 100_000                     # keys in one `has` action
SHUTDOWN_GRACE_S = 10.0                    # in-flight requests get this long after SIGTERM
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
    "has": "body: JSON list of keys → JSON list of those present",
    "stats": "JSON {segments, entries}",
    "remove": "body: segment name → remove it (write token)",
}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- wire helpers

def file_batches(files: dict[str, bytes], part_bytes: int = PART_BYTES) -> Iterator[pa.RecordBatch]:
    """A segment's files as FILE_SCHEMA batches: each file cut into parts of ≤ `part_bytes`
    (an empty file is one empty part), parts grouped so a batch carries ≤ `part_bytes` of data."""
    rows: list[tuple[str, int, bytes]] = []
    held = 0
    for rel in sorted(files):
        data = bytes(files[rel])
        parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
        for i, part in enumerate(parts):
            if rows and held + len(part) > part_bytes:
                yield _batch(rows)
                rows, held = [], 0
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
    or `max_bytes` bytes — so a hostile or broken stream costs at most the bound in memory."""
    parts: dict[str, list[bytes]] = {}
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
            have = parts.setdefault(rel, [])
            if part != len(have):
                raise SegmentRejected(f"segment {name}: {rel} part {part} arrived where part {len(have)} "
                                      "was expected (parts must be consecutive, from 0)")
            if len(parts) > max_files:
                raise SegmentRejected(f"segment {name} has more than {max_files} files")
            total += len(data)
            if total > max_bytes:
                raise SegmentRejected(f"segment {name} is over the limit of {max_bytes} bytes (the "
                                      "server's --max-segment-bytes)")
            have.append(data)
    return {rel: b"".join(chunks) for rel, chunks in parts.items()}, total


def read_tokens(path: str | os.PathLike, what: str) -> tuple[bytes, ...]:
    """Tokens from a file, one per non-empty line (`#` starts a comment line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}; "
                         "point it at a readable file with one token per line") from None
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise CacheError(f"the {what} {path} holds no token; write one token per line (e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))' >> FILE`)")
    return tokens


def _matches(token: bytes, tokens: tuple[bytes, ...]) -> bool:
    found = False
    for t in tokens:  # every one compared: how long it takes says nothing about which matched
        found |= hmac.compare_digest(token, t)
    return found


# ---------------------------------------------------------------------------- server

class _Auth(fl.ServerMiddleware):
    """Who is calling: role "write", "read" or None, and whether a token was sent at all."""

    def __init__(self, role: str | None, presented: bool):
        self.role, self.presented = role, presented


class _AuthFactory(fl.ServerMiddlewareFactory):
    def __init__(self, write_tokens: tuple[bytes, ...], read_tokens: tuple[bytes, ...]):
        self.write_tokens, self.read_tokens = write_tokens, read_tokens

    def start_call(self, info, headers):
        values = headers.get("authorization") or headers.get("Authorization") or []
        if not values:
            return _Auth(None, False)
        value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
        if not value.lower().startswith("bearer "):
            return _Auth(None, True)
        token = value[7:].strip().encode()
        role = ("write" if _matches(token, self.write_tokens)
                else "read" if _matches(token, self.read_tokens) else None)
        return _Auth(role, True)


class CacheServer(fl.FlightServerBase):
    """Arrow Flight over a local `Store` (wire formats: the module docstring). Every request is
    authorised, bounded and logged in one line; any malformed one gets an error and the server goes
    on serving. Uploads go through `Store.import_segment` (everything verified, published by one
    rename) under a per-name lock, so concurrent uploads of one segment publish it once."""

    def __init__(self, store_path: str | os.PathLike, location: str = "grpc://127.0.0.1:0", *,
                 write_tokens: tuple[bytes, ...] = (), read_tokens: tuple[bytes, ...] = (),
                 tls_certificates: list[tuple[bytes, bytes]] | None = None,
                 max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES, max_files: int = MAX_FILES):
        self.store = Store(store_path)
        self.write_tokens, self.read_tokens = tuple(write_tokens), tuple(read_tokens)
        self.max_segment_bytes, self.max_files = int(max_segment_bytes), int(max_files)
        self._locks: dict[str, list] = {}  # segment name → [lock, users]
        self._locks_guard = threading.Lock()
        self._reader: tuple[tuple[str, ...], Any] | None = None
        self._reader_lock = threading.Lock()
        self.stopping = False
        kwargs = {"tls_certificates": [fl.CertKeyPair(c, k) for c, k in tls_certificates]} if tls_certificates else {}
        super().__init__(location, middleware={"auth": _AuthFactory(self.write_tokens, self.read_tokens)},
                         **kwargs)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _request(self, context, action: str) -> Iterator[dict]:
        """Log one line per request (peer, action, what, bytes, ms, outcome) and turn every failure
        into a Flight error with a message for the user (never a traceback)."""
        info: dict[str, Any] = {"action": action}
        t0 = time.perf_counter()
        status = "ok"
        try:
            yield info
        except fl.FlightError as exc:
            status = f"refused ({type(exc).__name__}: {str(exc)[:200]})"
            raise
        except SegmentRejected as exc:  # an upload that fails verification, a bad name, a damaged segment
            status = f"rejected ({str(exc)[:200]})"
            msg = f"upload rejected, nothing was published: {exc}" if action == "put" else str(exc)
            raise fl.FlightServerError(msg, extra_info=b"rejected") from None
        except CacheError as exc:
            status = f"failed ({str(exc)[:200]})"
            raise fl.FlightServerError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug or an I/O failure: logged here, reported short
            status = f"internal error ({type(exc).__name__})"
            log.exception("request %s from %s failed", action, _peer(context))
            raise fl.FlightInternalError(f"internal error in the cache service ({type(exc).__name__}: "
                                         f"{str(exc)[:200]}); see the server's log") from None
        finally:
            what = " ".join(f"{k}={info[k]}" for k in ("segment", "segments", "entries") if k in info)
            log.info("peer=%s action=%s %sbytes=%d ms=%.1f status=%s", _peer(context), info["action"],
                     what + " " if what else "", info.get("bytes", 0), 1000 * (time.perf_counter() - t0),
                     status)

    def _authorize(self, context, need: str) -> None:
        """Writes always need a write token (none configured: no writes at all). Reads need a read
        or write token when read tokens are configured, and are open otherwise."""
        auth = context.get_middleware("auth")
        role, presented = (auth.role, auth.presented) if auth is not None else (None, False)
        unknown = (f"the token sent is not one this cache service accepts; set {TOKEN_ENV} to a token "
                   "from the server's --token-file (writes) or --read-token-file (reads)")
        if need == "write":
            if not self.write_tokens:
                raise fl.FlightUnauthorizedError(
                    "this cache service takes no writes: it was started without --token-file; restart "
                    f"it with `--token-file FILE` and set {TOKEN_ENV} to one of that file's tokens")
            if role == "write":
                return
            if role == "read":
                raise fl.FlightUnauthorizedError(
                    f"the token sent is a read-only token (--read-token-file); set {TOKEN_ENV} to a "
                    "write token from the server's --token-file to upload or remove segments")
            raise fl.FlightUnauthenticatedError(unknown if presented else (
                f"writing to the cache service needs a token: set {TOKEN_ENV} to a write token from "
                "the server's --token-file"))
        if not self.read_tokens or role is not None:
            return
        raise fl.FlightUnauthenticatedError(unknown if presented else (
            f"reading from this cache service needs a token: set {TOKEN_ENV} to a read token "
            "(--read-token-file) or a write token (--token-file) of the server"))

    @contextmanager
    def _segment_lock(self, name: str) -> Iterator[None]:
        with self._locks_guard:
            entry = self._locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[name]

    def _published(self, name: str) -> None:
        if name not in self.store.segment_names():
            raise fl.FlightServerError(f"no segment {name} in this cache service's store; list them with "
                                       "the `segments` action (`distill-pipeline cache ls --store URL`)",
                                       extra_info=b"not_found")

    def _entry_reader(self):
        """One CacheReader while the set of segments stays the same (opening one reads the index)."""
        from distill_pipeline.cache.reader import CacheReader

        names = tuple(self.store.segment_names())
        with self._reader_lock:
            if self._reader is None or self._reader[0] != names:
                self._reader = (names, CacheReader(self.store.root))
            return self._reader[1]

    # ------------------------------------------------------------------ actions

    def list_actions(self, context):
        with self._request(context, "list_actions"):
            return list(ACTIONS.items())

    def do_action(self, context, action):
        kind = action.type
        with self._request(context, kind if kind in ACTIONS else "unknown-action") as info:
            if kind not in ACTIONS:
                raise fl.FlightServerError(f"unknown action {str(kind)[:40]!r}; this service offers "
                                           + ", ".join(ACTIONS))
            self._authorize(context, "write" if kind == "remove" else "read")
            body = action.body.to_pybytes() if action.body is not None else b""
            out = getattr(self, f"_action_{kind}")(body, info)
            data = json.dumps(out).encode()
            info["bytes"] = len(data)
            return [data]

    def _action_segments(self, body: bytes, info: dict) -> list[str]:
        names = self.store.segment_names()
        info["segments"] = len(names)
        return names

    def _body_name(self, body: bytes, info: dict) -> str:
        try:
            name = body.decode()
        except UnicodeDecodeError:
            raise SegmentRejected("the segment name is not UTF-8") from None
        info["segment"] = validate_segment_name(name)
        return name

    def _action_commit(self, body: bytes, info: dict) -> dict:
        name = self._body_name(body, info)
        self._published(name)
        return self.store.commit_record(name)

    def _action_has(self, body: bytes, info: dict) -> list[str]:
        import pyarrow.compute as pc

        keys = _json_keys(body, MAX_HAS_KEYS, "the body of `has`")
        info["entries"] = len(keys)
        index = self.store.index_table()
        present = set(index.filter(pc.is_in(index.column("key"), value_set=pa.array(keys, pa.string())))
                      .column("key").to_pylist())
        return [k for k in keys if k in present]

    def _action_stats(self, body: bytes, info: dict) -> dict:
        names = self.store.segment_names()
        return {"segments": len(names), "entries": self.store.index_table().num_rows}

    def _action_remove(self, body: bytes, info: dict) -> dict:
        name = self._body_name(body, info)
        with self._segment_lock(name):
            there = name in self.store.segment_names()
            self.store.remove_segment(name)
        return {"removed": there}

    # ------------------------------------------------------------------ streams

    def do_get(self, context, ticket):
        with self._request(context, "get") as info:
            self._authorize(context, "read")
            req = _parse_ticket(ticket.ticket)
            kind = req["kind"]
            info["action"] = f"get:{kind}"
            if kind == "index":
                table = self.store.index_table()
                info["entries"] = table.num_rows
            elif kind == "segment":
                name = req.get("name")
                info["segment"] = validate_segment_name(name)
                self._published(name)
                files = self.store.segment_files(name)
                table = pa.Table.from_batches(list(file_batches(files)), schema=FILE_SCHEMA)
            else:  # entries
                keys = _json_keys(req.get("keys"), MAX_TICKET_KEYS, "the ticket's keys")
                table = self._entries_table(keys)
                info["entries"] = f"{table.num_rows}/{len(keys)}"
            info["bytes"] = table.nbytes
            return fl.RecordBatchStream(table)

    def _entries_table(self, keys: list[str]) -> pa.Table:
        reader = self._entry_reader()
        batches, rows, held = [], [], 0
        for key in keys:
            if key not in reader:
                continue  # absent keys are left out: the caller sees which
            e = reader.get(key)
            rows.append((key, e))
            held += e["ids"].nbytes + e["logp"].nbytes + 8 * len(e["lse"])
            if held >= PART_BYTES:
                batches.append(_entry_batch(rows))
                rows, held = [], 0
        if rows or not batches:
            batches.append(_entry_batch(rows))
        return pa.Table.from_batches(batches, schema=ENTRY_SCHEMA)

    def do_put(self, context, descriptor, reader, writer):
        with self._request(context, "put") as info:
            self._authorize(context, "write")
            name = _descriptor_segment(descriptor)
            info["segment"] = name

            def batches() -> Iterator[pa.RecordBatch]:
                if not reader.schema.equals(FILE_SCHEMA):
                    raise SegmentRejected(f"segment {name}: the upload's schema must be path: string, "
                                          "part: int32, data: binary")
                yield from _record_batches(reader)

            files, total = assemble_files(batches(), name, max_bytes=self.max_segment_bytes,
                                          max_files=self.max_files, stop=lambda: self.stopping)
            info["bytes"] = total
            with self._segment_lock(name):
                published = self.store.import_segment(name, files, max_bytes=self.max_segment_bytes)
            info["action"] = "put" if published else "put:present"
            writer.write(pa.py_buffer(json.dumps({"published": published}).encode()))

    def close(self, grace_s: float = SHUTDOWN_GRACE_S) -> bool:
        """Stop serving: uploads in flight are aborted at their next message, other requests get
        `grace_s` to finish. False if some did not (the caller may exit anyway: a publish is one
        rename, so an interrupted upload leaves nothing published)."""
        self.stopping = True
        done = threading.Thread(target=self.shutdown, daemon=True)
        done.start()
        done.join(grace_s)
        return not done.is_alive()


def _record_batches(reader) -> Iterator[pa.RecordBatch]:
    """The record batches of a Flight stream (an upload's reader or a do_get's), as they come."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:
            yield chunk.data


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 - the peer is only for the log line
        return "?"


def _json_keys(value: Any, limit: int, where: str) -> list[str]:
    if isinstance(value, (bytes, bytearray)):
        if len(value) > limit * 80 + 1024:  # before parsing: a key is 64 hex characters
            raise fl.FlightServerError(f"{where}: {len(value)} bytes, more than {limit} keys can take; "
                                       "ask in several requests")
        try:
            value = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            raise fl.FlightServerError(f"{where} is not JSON; send a JSON list of entry keys") from None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise fl.FlightServerError(f"{where} must be a JSON list of entry keys (strings)")
    if len(value) > limit:
        raise fl.FlightServerError(f"{where}: {len(value)} keys, over the limit of {limit} per request; "
                                   "ask in several requests")
    return value


def _parse_ticket(raw: bytes) -> dict:
    usage = ('expected a JSON object: {"kind": "index"}, {"kind": "segment", "name": N} or '
             '{"kind": "entries", "keys": [...]}')
    if len(raw) > MAX_TICKET_KEYS * 80 + 1024:  # before parsing: the largest valid ticket's size
        raise fl.FlightServerError(f"ticket of {len(raw)} bytes is too large; {usage} "
                                   f"(at most {MAX_TICKET_KEYS} keys)")
    try:
        req = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise fl.FlightServerError(f"malformed ticket (not JSON); {usage}") from None
    if not isinstance(req, dict) or req.get("kind") not in ("index", "segment", "entries"):
        kind = req.get("kind") if isinstance(req, dict) else None
        raise fl.FlightServerError(f"unknown ticket kind {str(kind)[:40]!r}; {usage}")
    return req


def _descriptor_segment(descriptor) -> str:
    path = list(descriptor.path or []) if descriptor.descriptor_type == fl.DescriptorType.PATH else []
    if len(path) != 2 or path[0] != b"segment":
        raise fl.FlightServerError('an upload\'s descriptor must be the path ["segment", <segment name>]')
    try:
        name = path[1].decode()
    except UnicodeDecodeError:
        raise SegmentRejected("the segment name is not UTF-8") from None
    return validate_segment_name(name)


def _entry_batch(rows: list[tuple[str, dict]]) -> pa.RecordBatch:
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


# ---------------------------------------------------------------------------- serve

def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          token_file: str | os.PathLike | None = None, read_token_file: str | os.PathLike | None = None,
          tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None,
          max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES, echo: Callable[[str], Any] = print) -> int:
    """Serve `store_path` until SIGTERM/SIGINT; print one line `serving <store> at <url>` once it
    listens; return 0 after a clean shutdown. Bad token or TLS files raise CacheError."""
    write_tokens = read_tokens(token_file, "token file (--token-file)") if token_file else ()
    reads = read_tokens(read_token_file, "read-token file (--read-token-file)") if read_token_file else ()
    if bool(tls_cert) != bool(tls_key):
        raise CacheError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    certs = None
    if tls_cert:
        try:
            certs = [(Path(tls_cert).read_bytes(), Path(tls_key).read_bytes())]
        except OSError as exc:
            raise CacheError(f"cannot read the TLS certificate/key {exc.filename}: {exc.strerror}") from None
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s cache-service %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    scheme = "grpc+tls" if certs else "grpc"
    where = f"[{host}]" if ":" in host else host
    try:
        server = CacheServer(store_path, f"{scheme}://{where}:{int(port)}", write_tokens=write_tokens,
                             read_tokens=reads, tls_certificates=certs, max_segment_bytes=max_segment_bytes)
    except CacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - ArrowException/OSError from binding or bad TLS files
        raise CacheError(f"cannot serve at {scheme}://{where}:{port}: {str(exc).splitlines()[0][:300]}; "
                         "check that the port is free and the host is an address of this machine "
                         "(and the TLS files are a PEM certificate and its key)") from None
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    url = f"{scheme}://{where}:{server.port}"
    log.info("serving %s at %s (writes: %s, reads: %s)", server.store.root, url,
             f"{len(write_tokens)} token(s)" if write_tokens else "off (no --token-file)",
             f"{len(reads)} read token(s) or a write token" if reads else "open")
    echo(f"serving {server.store.root} at {url}")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("shutting down")
        if not server.close():
            log.warning("requests still in flight after %.0f s; exiting without them (nothing half-"
                        "published: a segment is published by one rename)", SHUTDOWN_GRACE_S)
            logging.shutdown()
            os._exit(0)  # the gRPC server would wait for a stalled client forever
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distill_pipeline.cache.service`: `serve` with the flags of `cache serve`."""
    p = argparse.ArgumentParser(prog="python -m distill_pipeline.cache.service",
                                description="Serve a teacher-logit cache store over Arrow Flight.")
    p.add_argument("--store", required=True, help="the local store to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--token-file", help="write tokens, one per line (without it: no writes)")
    p.add_argument("--read-token-file", help="read tokens, one per line (without it: reads are open)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--max-segment-bytes", type=int, default=DEFAULT_MAX_SEGMENT_BYTES)
    a = p.parse_args(argv)
    try:
        return serve(a.store, a.host, a.port, a.token_file, a.read_token_file, a.tls_cert, a.tls_key,
                     max_segment_bytes=a.max_segment_bytes)
    except CacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- client

class FlightRemote:
    """The cache service as a `Remote` (remote.py): what `MirroredStore` and `cache push/pull` use.
    Sends `DISTILL_CACHE_TOKEN` (or `token`) on every call; every failure is a CacheError saying
    what to check (SegmentRejected when the service refused an upload or sent a damaged segment)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float | None = 600.0):
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

    def __repr__(self) -> str:
        return f"FlightRemote({self.url!r})"

    def _fail(self, exc: Exception, what: str) -> CacheError:
        msg = str(exc).split(". Detail:")[0].split(". gRPC client debug context")[0].strip()
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
            yield from _record_batches(reader)

    # ------------------------------------------------------------------ Remote
    def segment_names(self) -> list[str]:
        return self._action("segments", what="list segments")

    def commit_record(self, name: str) -> dict:
        return self._action("commit", validate_segment_name(name).encode(), f"give the record of segment {name}")

    def index_table(self) -> pa.Table:
        with self._call("send its key index"):
            return self._client.do_get(fl.Ticket(b'{"kind": "index"}'), self._options).read_all()

    def get_segment(self, name: str) -> dict[str, bytes]:
        record = self.commit_record(name)
        listed = record.get("files") or {}
        files, _ = assemble_files(self._stream({"kind": "segment", "name": name}, f"send segment {name}"),
                                  name, max_bytes=sum(int(m["size"]) for m in listed.values()),
                                  max_files=max(1, len(listed)))
        check_against_record(name, files, record, self.url)
        return files

    def put_segment(self, name: str, files: dict[str, bytes]) -> bool:
        validate_segment_name(name)
        for rel in files:
            validate_segment_file(rel)
        if name in self.segment_names():
            return False
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

    # ------------------------------------------------------------------ more than a Remote
    def has(self, keys: Iterable[str]) -> set[str]:
        """The keys the service holds."""
        keys, out = list(keys), set()
        for i in range(0, len(keys), MAX_HAS_KEYS):
            out.update(self._action("has", json.dumps(keys[i:i + MAX_HAS_KEYS]).encode(), "look up keys"))
        return out

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


if __name__ == "__main__":
    sys.exit(main())
