"""The cache service: one teacher-logit store shared over Arrow Flight (the server side).

    distill-pipeline cache serve --store PATH [--host H] [--port P] [--token-file F]
                                 [--read-token-file F] [--tls-cert C --tls-key K]
                                 [--max-segment-mb MB] [--max-concurrent-uploads N] [--upload-wait-s S]
    python -m distill_pipeline.cache.service --store PATH ...            (the same, without Typer)

`CacheServer` serves a local `Store`; the wire format and the client (`FlightRemote`, what
`open_store("grpc://host:port")` wraps in a `MirroredStore`) are in `flight.py`. Writes (uploads,
removals) need a write token (`--token-file`; no file: the service takes no writes); reads need a
read or write token when `--read-token-file` is given, else they are open.

Memory: an upload is held whole while it is verified (its bytes, then its decoded arrays), so at
most `--max-concurrent-uploads` are received at once — one beyond that waits up to
`--upload-wait-s` for a slot and is then refused as busy (retryable). Reads are streamed: a
segment file by file, entries in batches of ≤ PART_BYTES (decoded chunks go through one
`CacheReader`'s bounded LRU).
"""
from __future__ import annotations

import argparse
import ctypes
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
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as fl

from distill_pipeline.cache.flight import (ACTIONS, BUSY, DEFAULT_MAX_CONCURRENT_UPLOADS,
                                           DEFAULT_MAX_SEGMENT_BYTES, DEFAULT_UPLOAD_WAIT_S, ENTRY_SCHEMA,
                                           FILE_SCHEMA, MAX_FILES, MAX_HAS_KEYS, MAX_RECORD_NAMES, MAX_TICKET_KEYS, PART_BYTES,
                                           TOKEN_ENV, assemble_files, entry_batch, file_batches, record_batches)
from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.segment import (CacheError, SegmentRejected, check_against_record, damage_advice,
                                            validate_segment_file, validate_segment_name)
from distill_pipeline.cache.store import NoStore, Store

SHUTDOWN_GRACE_S = 10.0  # in-flight requests get this long after SIGTERM
log = logging.getLogger(__name__)


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
    rename) under a per-name lock, so concurrent uploads of one segment publish it once; at most
    `max_concurrent_uploads` are received at once (the others wait up to `upload_wait_s`, then
    are refused as busy). Reads are streamed (`GeneratorStream`): nothing is built whole."""

    def __init__(self, store_path: str | os.PathLike, location: str = "grpc://127.0.0.1:0", *,
                 write_tokens: tuple[bytes, ...] = (), read_tokens: tuple[bytes, ...] = (),
                 tls_certificates: list[tuple[bytes, bytes]] | None = None,
                 max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES, max_files: int = MAX_FILES,
                 max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
                 upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S, create: bool = False):
        if int(max_concurrent_uploads) < 1:
            raise CacheError(f"--max-concurrent-uploads must be at least 1, not {max_concurrent_uploads} "
                             "(to take no uploads at all, start the service without --token-file)")
        if not float(upload_wait_s) >= 0:
            raise CacheError(f"--upload-wait-s must be 0 or more seconds, not {upload_wait_s}")
        self.store = Store(store_path, create=create)
        self.write_tokens, self.read_tokens = tuple(write_tokens), tuple(read_tokens)
        self.max_segment_bytes, self.max_files = int(max_segment_bytes), int(max_files)
        self.max_concurrent_uploads, self.upload_wait_s = int(max_concurrent_uploads), float(upload_wait_s)
        self._upload_slots = threading.BoundedSemaphore(self.max_concurrent_uploads)
        self._locks: dict[str, list] = {}  # segment name → [lock, users]
        self._locks_guard = threading.Lock()
        self.stopping = False
        kwargs = {"tls_certificates": [fl.CertKeyPair(c, k) for c, k in tls_certificates]} if tls_certificates else {}
        super().__init__(location, middleware={"auth": _AuthFactory(self.write_tokens, self.read_tokens)},
                         **kwargs)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _request(self, context, action: str, *, info: dict | None = None, streamed: bool = False
                 ) -> Iterator[dict]:
        """Log one line per request (peer, action, what, bytes, ms, outcome) and turn every failure
        into a Flight error with a message for the user (never a traceback). `streamed`: the request
        goes on in a stream (`_streamed`), which logs it when it ends; here only a failure is."""
        if info is None:
            info = {"action": action, "t0": time.perf_counter(), "peer": _peer(context)}
        status = "ok"
        try:
            yield info
        except GeneratorExit:  # a stream closed before its end: the client went away
            status = "cancelled (the client stopped reading)"
            raise
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
            if not (streamed and status == "ok"):
                what = " ".join(f"{k}={info[k]}" for k in ("segment", "segments", "entries") if k in info)
                queued = f" queued_ms={info['queued_ms']:.1f}" if "queued_ms" in info else ""
                log.info("peer=%s action=%s %sbytes=%d ms=%.1f%s status=%s", info["peer"], info["action"],
                         what + " " if what else "", info.get("bytes", 0),
                         1000 * (time.perf_counter() - info["t0"]), queued, status)

    def _streamed(self, context, info: dict, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """A do_get's batches as Flight pulls them, inside its request: errors mapped as any
        request's, bytes counted as sent, one log line when the stream ends."""
        with self._request(context, info["action"], info=info):
            for batch in batches:
                info["bytes"] = info.get("bytes", 0) + batch.nbytes
                yield batch

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

    @contextmanager
    def _upload_slot(self, info: dict) -> Iterator[None]:
        """One of `max_concurrent_uploads` slots, held while an upload is received and verified
        (that is when it is in memory). Waits up to `upload_wait_s` for one, then refuses the upload
        as busy (retryable) before reading any of it."""
        t0 = time.monotonic()
        deadline = t0 + self.upload_wait_s
        while not self._upload_slots.acquire(timeout=max(0.0, min(0.25, deadline - time.monotonic()))):
            if self.stopping:
                raise fl.FlightUnavailableError("the cache service is shutting down; upload again when it "
                                                "is back")
            if time.monotonic() >= deadline:
                info["queued_ms"] = 1000 * (time.monotonic() - t0)
                raise fl.FlightUnavailableError(
                    f"the cache service is busy: it is receiving {self.max_concurrent_uploads} upload(s), its "
                    f"limit (--max-concurrent-uploads), and this one waited {self.upload_wait_s:g} s "
                    "(--upload-wait-s) for a slot; nothing of it was read: send it again later",
                    extra_info=BUSY)
        waited = time.monotonic() - t0
        if waited >= 0.001:
            info["queued_ms"] = 1000 * waited
        try:
            yield
        finally:
            self._upload_slots.release()

    def _published(self, name: str) -> None:
        if name not in self.store.segment_names():
            raise fl.FlightServerError(f"no segment {name} in this cache service's store; list them with "
                                       "the `segments` action (`distill-pipeline cache ls --store URL`)",
                                       extra_info=b"not_found")

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

    def _action_commits(self, body: bytes, info: dict) -> dict[str, dict]:
        names = [validate_segment_name(n) for n in
                 _json_keys(body, MAX_RECORD_NAMES, "the body of `commits`", "segment names")]
        info["segments"] = len(names)
        published, out = set(self.store.segment_names()), {}
        for n in names:
            if n in published:
                try:
                    out[n] = self.store.commit_record(n)
                except CacheError:  # removed since it was listed: left out, as an absent name is
                    continue
        return out

    def _action_has(self, body: bytes, info: dict) -> list[str]:
        keys = _json_keys(body, MAX_HAS_KEYS, "the body of `has`")
        info["entries"] = len(keys)
        present = set(self.store.lookup(keys).column("key").to_pylist())  # what the keys touch
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
        """A stream, produced as Flight sends it: what is wrong with the ticket is an error at once,
        what goes wrong while streaming (a damaged file) ends the stream with an error."""
        with self._request(context, "get", streamed=True) as info:
            self._authorize(context, "read")
            req = _parse_ticket(ticket.ticket)
            kind = req["kind"]
            info["action"] = f"get:{kind}"
            if kind == "index":
                table = self.store.index_table()
                info["entries"] = table.num_rows
                schema, batches = table.schema, iter(table.to_batches())
            elif kind == "segment":
                name = req.get("name")
                info["segment"] = validate_segment_name(name)
                self._published(name)
                schema, batches = FILE_SCHEMA, file_batches(self._segment_files(name))
            elif kind == "rows":  # what the keys touch of the index (partitions), not all of it
                keys = _json_keys(req.get("keys"), MAX_TICKET_KEYS, "the ticket's keys")
                table = self.store.lookup(keys)
                info["entries"] = table.num_rows
                schema, batches = table.schema, iter(table.to_batches())
            else:  # entries
                keys = _json_keys(req.get("keys"), MAX_TICKET_KEYS, "the ticket's keys")
                schema, batches = ENTRY_SCHEMA, self._entry_batches(keys, info)
            return fl.GeneratorStream(schema, self._streamed(context, info, batches))

    def _segment_files(self, name: str) -> Iterator[tuple[str, bytes]]:
        """(path, bytes) of a published segment's files in order of path, read one at a time, each
        checked against the segment's commit record (size, sha256) before it is handed on: what is
        sent is what was published, or the stream ends with a SegmentRejected saying which file."""
        record = self.store.commit_record(name)
        listed = record.get("files") or {}
        seg = self.store.segment_path(name)
        for rel in sorted(listed):
            try:
                data = (seg / validate_segment_file(rel)).read_bytes()
            except FileNotFoundError:
                if name not in self.store.segment_names():
                    raise CacheError(f"segment {name} was removed from this cache service's store while "
                                     "it was being sent; list the segments again") from None
                raise SegmentRejected(f"segment {name} in {self.store.root}: {rel} is missing (deleted or "
                                      f"damaged); {damage_advice(self.store.url)}") from None
            try:
                check_against_record(name, {rel: data}, {"files": {rel: listed[rel]}}, str(self.store.root))
            except SegmentRejected as exc:
                raise SegmentRejected(f"{exc}; {damage_advice(self.store.url)}") from None
            yield rel, data

    def _entry_batches(self, keys: list[str], info: dict) -> Iterator[pa.RecordBatch]:
        """ENTRY_SCHEMA batches of the keys present (absent ones are left out: the caller sees
        which), each of ≤ PART_BYTES of ids and log-probs unless one entry alone is larger."""
        reader = CacheReader(self.store, keys=keys)  # looks up these keys only, not the whole index
        rows, held, sent = [], 0, 0
        info["entries"] = f"0/{len(keys)}"
        for key in keys:
            if key not in reader:
                continue
            e = reader.get(key)
            size = e["ids"].nbytes + e["logp"].nbytes + 8 * len(e["lse"])
            if rows and held + size > PART_BYTES:
                batch, sent, rows, held = entry_batch(rows), sent + len(rows), [], 0
                info["entries"] = f"{sent}/{len(keys)}"
                yield batch
            rows.append((key, e))
            held += size
        if rows:
            yield entry_batch(rows)
            sent += len(rows)
            info["entries"] = f"{sent}/{len(keys)}"

    def do_put(self, context, descriptor, reader, writer):
        with self._request(context, "put") as info:
            self._authorize(context, "write")
            name = _descriptor_segment(descriptor)
            info["segment"] = name

            def batches() -> Iterator[pa.RecordBatch]:
                if not reader.schema.equals(FILE_SCHEMA):
                    raise SegmentRejected(f"segment {name}: the upload's schema must be path: string, "
                                          "part: int32, data: binary")
                yield from record_batches(reader)

            with self._upload_slot(info):  # held while the upload is in memory: received, verified
                files, total = assemble_files(batches(), name, max_bytes=self.max_segment_bytes,
                                              max_files=self.max_files, stop=lambda: self.stopping)
                info["bytes"] = total
                with self._segment_lock(name):
                    published = self.store.import_segment(name, files, max_bytes=self.max_segment_bytes)
                del files
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


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 - the peer is only for the log line
        return "?"


def _json_keys(value: Any, limit: int, where: str, what: str = "entry keys") -> list[str]:
    """A JSON list of at most `limit` strings (entry keys: 64 hex characters; segment names: ≤ 128
    characters), its size bounded before it is parsed."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > limit * 140 + 1024:
            raise fl.FlightServerError(f"{where}: {len(value)} bytes, more than {limit} {what} can take; "
                                       "ask in several requests")
        try:
            value = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            raise fl.FlightServerError(f"{where} is not JSON; send a JSON list of {what}") from None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise fl.FlightServerError(f"{where} must be a JSON list of {what} (strings)")
    if len(value) > limit:
        raise fl.FlightServerError(f"{where}: {len(value)} {what}, over the limit of {limit} per request; "
                                   "ask in several requests")
    return value


def _parse_ticket(raw: bytes) -> dict:
    usage = ('expected a JSON object: {"kind": "index"}, {"kind": "rows", "keys": [...]}, '
             '{"kind": "segment", "name": N} or {"kind": "entries", "keys": [...]}')
    if len(raw) > MAX_TICKET_KEYS * 80 + 1024:  # before parsing: the largest valid ticket's size
        raise fl.FlightServerError(f"ticket of {len(raw)} bytes is too large; {usage} "
                                   f"(at most {MAX_TICKET_KEYS} keys)")
    try:
        req = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise fl.FlightServerError(f"malformed ticket (not JSON); {usage}") from None
    if not isinstance(req, dict) or req.get("kind") not in ("index", "rows", "segment", "entries"):
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


# ---------------------------------------------------------------------------- serve

def _free_memory_promptly() -> str:
    """Make the server process give freed memory back, so its RSS follows what its requests hold:
    Arrow buffers from the system allocator (mimalloc, pyarrow's default, keeps freed pages per
    thread), and glibc's mmap threshold fixed at 128 KiB (by default it rises after a large free,
    and large buffers freed later stay in the heap). Measured on 4 concurrent reads of a 24 MB
    segment: peak RSS +136 MiB and growing from round to round with the defaults, +51 MiB and back
    to the baseline after each round with these. Only `serve` calls it: it is process-wide."""
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        fixed = ctypes.CDLL(None).mallopt(-3, 128 << 10) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator's own policy
        fixed = False
    return "system allocator" + (", mmap threshold 128 KiB" if fixed else "")


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          token_file: str | os.PathLike | None = None, read_token_file: str | os.PathLike | None = None,
          tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None,
          max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
          max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
          upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S, create: bool = False,
          echo: Callable[[str], Any] = print) -> int:
    """Serve `store_path` until SIGTERM/SIGINT; print one line `serving <store> at <url>` once it
    listens; return 0 after a clean shutdown. Bad token or TLS files, and a store that does not
    exist (unless `create`: a mistyped path would serve an empty store), raise CacheError."""
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
    memory = _free_memory_promptly()
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s cache-service %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    scheme = "grpc+tls" if certs else "grpc"
    where = f"[{host}]" if ":" in host else host
    try:
        server = CacheServer(store_path, f"{scheme}://{where}:{int(port)}", write_tokens=write_tokens,
                             read_tokens=reads, tls_certificates=certs, max_segment_bytes=max_segment_bytes,
                             max_concurrent_uploads=max_concurrent_uploads, upload_wait_s=upload_wait_s,
                             create=create)
    except NoStore as exc:  # a mistyped path would serve an empty store
        raise NoStore(f"{exc}; or serve a new one with `cache serve --create`") from None
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
    if write_tokens:
        log.info("uploads: at most %d at once, each of at most %d bytes; one beyond waits up to %g s for a "
                 "slot, then is refused as busy", server.max_concurrent_uploads, server.max_segment_bytes,
                 server.upload_wait_s)
    log.info("memory: %s (freed buffers go back to the OS)", memory)
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
    p.add_argument("--create", action="store_true", help="create the store if it does not exist")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--token-file", help="write tokens, one per line (without it: no writes)")
    p.add_argument("--read-token-file", help="read tokens, one per line (without it: reads are open)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--max-segment-bytes", type=int, default=DEFAULT_MAX_SEGMENT_BYTES)
    p.add_argument("--max-concurrent-uploads", type=int, default=DEFAULT_MAX_CONCURRENT_UPLOADS,
                   help="uploads received at once (each is held in memory until verified)")
    p.add_argument("--upload-wait-s", type=float, default=DEFAULT_UPLOAD_WAIT_S,
                   help="how long an upload beyond that waits for a slot before it is refused as busy")
    a = p.parse_args(argv)
    try:
        return serve(a.store, a.host, a.port, a.token_file, a.read_token_file, a.tls_cert, a.tls_key,
                     max_segment_bytes=a.max_segment_bytes, max_concurrent_uploads=a.max_concurrent_uploads,
                     upload_wait_s=a.upload_wait_s, create=a.create)
    except CacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())

