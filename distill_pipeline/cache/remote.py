"""Stores by URL: a local path, an object store through fsspec, or the cache service.

`open_store(url)` is the one way the rest of the package gets a store:

- a path (or `file://path`) → `Store`, the local store (`store.py`);
- `s3://bucket/prefix`, `gs://…`, `az://…`, … → `MirroredStore(FsspecRemote(url))`; credentials
  and endpoint come from the usual environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …);
- `grpc://host:port`, `grpc+tls://host:port` → `MirroredStore(FlightRemote(url))`, the cache
  service (`service.py`; writes need `DISTILL_CACHE_TOKEN`).

A *remote* is a place segments live: it lists committed segments, serves its consolidated key
index, hands out a segment's files (checked against its commit record) and accepts new ones.
`MirroredStore` puts a local store in front of it — `<DISTILL_CACHE_DIR>/mirrors/<hash of the
URL>` — so that everything else works on local files: extraction publishes into the mirror and
uploads the segment; training opens segments, which are fetched on first use (verified against
the commit record, then every chunk, key and checksum, as any import) and kept there, within
`DISTILL_MIRROR_GB` (default 20), during a run as between runs: a process *pins* the segments it
reads (a shared flock on `pins/<id>.lock`: `CacheReader` keeps a few open and releases the
rest), and whenever a fetch or an upload takes the mirror over its bound, the least recently
used segments that no process pins are dropped (each only once its pin file can be locked
exclusively, so nothing is deleted under a reader, in this process or another).

On an object store there is no rename: a segment's files are written first, its key index file
next, its commit record `commits/<id>.json` last. Listings and key lookups see only segments
with a commit record; `cache gc` removes the files of uncommitted segments once they are older
than the grace period (a writer that died mid-upload).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Protocol

from distill_pipeline.cache import index as key_index
from distill_pipeline.cache.format import SCHEMA_VERSION
from distill_pipeline.cache.index import KEY_COLUMNS, FsspecIndexFiles
from distill_pipeline.cache.segment import (CacheError, SegmentData, SegmentRejected, check_against_record,
                                            record_for, validate_segment_file, validate_segment_name)
from distill_pipeline.cache.store import STORE_META, NoStore, Store
from distill_pipeline.env import default_root

REMOTE_SCHEMES = ("grpc://", "grpc+tls://")


class Remote(Protocol):
    """What `MirroredStore` needs of a place segments live (`FsspecRemote`, `flight.FlightRemote`)."""
    url: str

    def segment_names(self) -> list[str]: ...             # committed segments
    def commit_record(self, name: str) -> dict: ...        # {"segment", "files", "manifest"}
    # those of `names` committed → their records (one request per many: `cache ls/info`)
    def commit_records(self, names: Iterable[str]) -> dict[str, Any]: ...
    def index_table(self) -> Any: ...                      # KEY_COLUMNS + segment, committed only
    def lookup(self, keys: Iterable[str]) -> Any: ...      # the rows of `keys`, committed only
    def has(self, keys: Iterable[str]) -> set[str]: ...    # those of `keys` it holds
    def get_segment(self, name: str) -> dict[str, bytes]: ...  # checked against the record
    def put_segment(self, name: str, files: dict[str, bytes]) -> bool: ...  # False: already there
    def remove_segment(self, name: str) -> None: ...
    # segment folders without a commit record → age in seconds (a writer died mid-upload);
    # None where uploads are published by rename on the remote's side (the service)
    def uncommitted(self) -> dict[str, float] | None: ...


_ALMOST_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")


def is_remote(url: str | os.PathLike | None) -> bool:
    if url is None:
        return False
    text = str(url)
    return "://" in text and not text.startswith("file://")


def open_store(url: str | os.PathLike | None = None, *, create: bool = True):
    """The store a `--store` / `teacher_logits.store` value names (see the module docstring)."""
    if url is None or str(url) == "":
        return Store(None, create=create)
    text = str(url)
    if _ALMOST_URL.match(text):
        scheme, rest = text.split(":/", 1)
        raise CacheError(f"store {text!r} looks like a URL with a slash missing; did you mean "
                         f"{scheme}://{rest}? (a local directory: write it without a scheme)")
    if text.startswith("file://"):
        return Store(text[len("file://"):], create=create)
    if text.startswith(REMOTE_SCHEMES):
        from distill_pipeline.cache.flight import FlightRemote  # pyarrow.flight only when asked for

        return MirroredStore(FlightRemote(text))
    if "://" in text:
        return MirroredStore(FsspecRemote(text, create=create))
    return Store(text, create=create)


def _transport_errors(what: str):
    """Method decorator: errors of the object store (credentials, endpoint, permissions, a
    corrupt JSON record) become one CacheError naming the store and what to check."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (CacheError, FileNotFoundError):
                raise
            except Exception as exc:  # noqa: BLE001 - botocore/aiohttp/OSError/ValueError: one message
                raise CacheError(f"cannot {what} {self.url}: {type(exc).__name__}: {exc}. Check the "
                                 "credentials and endpoint in the environment (AWS_ENDPOINT_URL, "
                                 "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and that they may read "
                                 "and write this bucket") from None
        return inner
    return wrap


class FsspecRemote:
    """A store on an fsspec filesystem, laid out like a local one (store.json, segments/,
    commits/, index/), with the commit record written last instead of a rename."""

    def __init__(self, url: str, *, create: bool = True):
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, use_listings_cache=False,
                                                       skip_instance_cache=True)
        except ImportError as exc:
            raise CacheError(f"{self.url}: the {protocol}:// filesystem is not installed ({exc}); for "
                             "S3 `pip install 'distill-pipeline[s3]'` (s3fs)") from None
        except ValueError as exc:
            raise CacheError(f"{self.url}: not a store URL fsspec knows ({exc})") from None
        self.path = self.path.rstrip("/")
        meta = f"{self.path}/store.json"
        try:
            found = json.loads(self.fs.cat_file(meta))
        except FileNotFoundError:
            found = None
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint, bucket: one message
            raise CacheError(f"cannot reach the store {self.url}: {type(exc).__name__}: {exc}. Check "
                             "the URL, the bucket, and the credentials/endpoint in the environment "
                             "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None
        if found is None:
            if not create:
                raise NoStore(f"no teacher-logit cache at {self.url} (no store.json there); check "
                                 "the URL in --store / teacher_logits.store (a mistyped one would start "
                                 "an empty store and extract everything again) — to start a new shared "
                                 f"store there, run `distill-pipeline cache init {self.url}`, or copy one "
                                 f"in with `distill-pipeline cache push SRC {self.url}`")
            try:
                self.fs.pipe_file(meta, json.dumps(STORE_META).encode())
            except Exception as exc:  # noqa: BLE001
                raise CacheError(f"cannot create a teacher-logit cache at {self.url}: "
                                 f"{type(exc).__name__}: {exc}") from None
        elif not isinstance(found, dict) or found.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{self.url}: cache schema {found.get('schema_version') if isinstance(found, dict) else '?'}, "
                             f"this version reads schema {SCHEMA_VERSION}; point the store elsewhere")

    def _p(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def _names(self, sub: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(sub), detail=False)]
        except FileNotFoundError:
            return []

    @_transport_errors("list the segments of")
    def segment_names(self) -> list[str]:
        return sorted(n[:-5] for n in self._names("commits") if n.endswith(".json"))

    @_transport_errors("read a commit record from")
    def commit_record(self, name: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._p("commits", f"{validate_segment_name(name)}.json")))
        except FileNotFoundError:
            raise CacheError(f"no segment {name} in {self.url}") from None

    @_transport_errors("read commit records from")
    def commit_records(self, names: Iterable[str]) -> dict[str, Any]:
        """Read together (s3fs fetches them concurrently); a record that is not JSON is returned as
        {"unreadable": why} for the caller to report; one removed meanwhile is left out."""
        paths = [self._p("commits", f"{validate_segment_name(n)}.json") for n in names]
        out: dict[str, Any] = {}
        for path, data in (self.fs.cat(paths, on_error="return") if paths else {}).items():
            name = path.rstrip("/").rsplit("/", 1)[-1][:-len(".json")]
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, Exception):
                raise data
            try:
                out[name] = json.loads(data)
            except ValueError as exc:
                out[name] = {"unreadable": f"not JSON ({exc})"}
        return out

    def _index_files(self) -> FsspecIndexFiles:
        return FsspecIndexFiles(self.fs, self._p("index"))

    def _live(self, names: Iterable[str]) -> set[str]:
        """Of `names`, the committed segments: one existence check each for a few, one listing
        of the commit records for many."""
        names = set(names)
        if len(names) > 64:
            return names & set(self.segment_names())
        return {n for n in names if self.fs.exists(self._p("commits", f"{n}.json"))}

    @_transport_errors("look up keys in")
    def lookup(self, keys: Iterable[str]):
        return key_index.lookup(self._index_files(), keys, self._live)

    def has(self, keys: Iterable[str]) -> set[str]:
        return set(self.lookup(keys).column("key").to_pylist())

    @_transport_errors("read the key index of")
    def index_table(self):
        """Every row of the index (the whole catalogue), and the rows of committed segments no
        index file covers, read from their own index.parquet."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = key_index.read_all(self._index_files(), self._live)
        covered = set(pc.unique(table.column("segment")).to_pylist())
        extra = []
        for name in sorted(set(self.segment_names()) - covered):  # committed without an index file
            try:
                extra.append(key_index.segment_rows(name, self.fs.cat_file(self._p("segments", name, "index.parquet"))))
            except Exception:  # noqa: BLE001 - unreadable: its entries count as absent
                continue
        return pa.concat_tables([table, *extra], promote_options="permissive") if extra else table

    @_transport_errors("fetch a segment from")
    def get_segment(self, name: str) -> dict[str, bytes]:
        record = self.commit_record(name)
        paths = {self._p("segments", name, validate_segment_file(rel)): rel for rel in record["files"]}
        data = self.fs.cat(list(paths), on_error="return")
        files = {}
        for path, rel in paths.items():
            blob = data.get(path)
            if blob is None or isinstance(blob, FileNotFoundError):
                raise SegmentRejected(f"segment {name} in {self.url}: {rel} is missing")
            if isinstance(blob, Exception):  # transport, permissions: not the segment's fault
                raise CacheError(f"cannot read segment {name} from {self.url}: {rel}: "
                                 f"{type(blob).__name__}: {blob}")
            files[rel] = blob
        check_against_record(name, files, record, self.url)
        return files

    @_transport_errors("upload a segment to")
    def put_segment(self, name: str, files: dict[str, bytes]) -> bool:
        validate_segment_name(name)
        if self.fs.exists(self._p("commits", f"{name}.json")):
            return False
        for rel in files:
            validate_segment_file(rel)
        record = record_for(name, files)
        self.fs.pipe({self._p("segments", name, rel): bytes(data) for rel, data in files.items()})
        key_index.add(self._index_files(), name, key_index.segment_rows(name, files["index.parquet"]))
        self.fs.pipe_file(self._p("commits", f"{name}.json"), json.dumps(record).encode())  # publishes it
        present = {p.rsplit(f"/segments/{name}/", 1)[-1] for p in self.fs.find(self._p("segments", name))}
        if not set(files) <= present:  # a `cache gc` of an older, abandoned upload raced this one
            self.fs.rm_file(self._p("commits", f"{name}.json"))
            raise CacheError(f"upload of segment {name} to {self.url} lost files to a concurrent "
                             "`cache gc`; nothing was published — run the command again")
        try:
            key_index.pack(self._index_files(), self._live)
        except Exception:  # noqa: BLE001 - packing is an optimisation: the segment is published
            pass
        return True

    @_transport_errors("remove a segment from")
    def remove_segment(self, name: str) -> None:
        validate_segment_name(name)
        try:
            self.fs.rm_file(self._p("commits", f"{name}.json"))  # first: readers stop seeing it
        except FileNotFoundError:
            pass
        key_index.drop(self._index_files(), name)
        try:
            self.fs.rm(self._p("segments", name), recursive=True)
        except FileNotFoundError:
            pass

    @_transport_errors("list the uploads of")
    def uncommitted(self) -> dict[str, float]:
        """Segment folders without a commit record → age in seconds of their newest file."""
        committed = set(self.segment_names())
        out: dict[str, float] = {}
        now = time.time()
        for name in self._names("segments"):
            if name in committed:
                continue
            newest = 0.0
            try:
                for info in self.fs.find(self._p("segments", name), detail=True).values():
                    modified = info.get("LastModified") or info.get("mtime") or info.get("created")
                    if hasattr(modified, "timestamp"):
                        modified = modified.timestamp()
                    newest = max(newest, float(modified or 0))
            except FileNotFoundError:
                continue
            out[name] = now - newest if newest else float("inf")
        return out


def mirror_root(url: str) -> Path:
    """Where a remote store's local mirror lives (one per URL, beside the default store)."""
    return default_root().parent / "mirrors" / hashlib.sha256(url.encode()).hexdigest()[:16]


class MirroredStore:
    """A remote store seen through a local store (see the module docstring). Offers what the
    pipeline uses of `Store`: key lookups, publishing, opening segments, removing them."""

    def __init__(self, remote: Remote, local: str | os.PathLike | None = None,
                 max_bytes: float | None = None):
        self.remote = remote
        self.local = Store(local or os.environ.get("DISTILL_MIRROR_DIR") or mirror_root(remote.url))
        try:
            gb = float(os.environ.get("DISTILL_MIRROR_GB", "20")) if max_bytes is None else max_bytes / 1e9
        except ValueError:
            raise CacheError(f"DISTILL_MIRROR_GB={os.environ['DISTILL_MIRROR_GB']!r} is not a number "
                             "(gigabytes of remote segments kept locally)") from None
        self.max_bytes = gb * 1e9
        self._pins: dict[str, list] = {}  # segment → [its pin file (shared flock held), uses]
        self._checked: set[str] = set()  # local copies found equal to the remote's this process
        self._lock = threading.Lock()
        self._reading = None  # shared flock on readers.lock while this process may read the mirror

    def _share(self) -> None:
        """Hold a shared lock on the mirror: other processes do not delete from it meanwhile."""
        import fcntl

        if self._reading is None:
            fh = open(self.local.root / "readers.lock", "a+")
            fcntl.flock(fh, fcntl.LOCK_SH)
            self._reading = fh

    @contextmanager
    def _alone(self):
        """Yields whether no other process reads the mirror (an exclusive lock was taken): only
        then are segments deleted from it (a segment deleted under a reader would read as zeros)."""
        import fcntl

        held = self._reading is not None
        if held:
            fcntl.flock(self._reading, fcntl.LOCK_UN)
        fh = open(self.local.root / "readers.lock", "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except OSError:
                alone = False
            yield alone
        finally:
            fh.close()
            if held:
                fcntl.flock(self._reading, fcntl.LOCK_SH)

    @property
    def url(self) -> str:
        return self.remote.url

    def __repr__(self) -> str:
        return f"MirroredStore({self.remote.url!r}, local={str(self.local.root)!r})"

    # ------------------------------------------------------------------ lookups
    def segment_names(self) -> list[str]:
        return self.remote.segment_names()

    def index_table(self, *, damaged: dict[str, str] | None = None):
        return self.remote.index_table()

    def lookup(self, keys: Iterable[str]):
        return self.remote.lookup(keys)

    def index(self, columns: list[str] | None = None, *, damaged: dict[str, str] | None = None):
        if columns is None or not set(columns) <= set(KEY_COLUMNS):
            raise CacheError(f"{self.url}: a remote store's index holds {', '.join(KEY_COLUMNS)} only")
        return self.index_table().select(list(columns) + ["segment"])

    def existing_keys(self) -> set[str]:
        return set(self.index_table().column("key").to_pylist())

    def missing(self, keys) -> set[str]:
        import pyarrow as pa

        wanted = pa.array(sorted(set(keys)), pa.string())
        if not len(wanted):
            return set()
        return set(wanted.to_pylist()) - self.remote.has(wanted.to_pylist())

    # ------------------------------------------------------------------ segments
    def publish(self, segment_id: str, data: SegmentData, manifest: dict) -> bool:
        """Stage the segment in the mirror, then upload it (also when an earlier upload of it
        was interrupted: the mirror has it, the remote has no commit record). When another writer
        committed the same segment first, with other bytes (another machine's rounding), the
        local copy is dropped: what is read is always the remote's."""
        self._share()
        self._pin(segment_id)  # another process's eviction must not delete it mid-upload
        try:
            self.local.publish(segment_id, data, manifest)
            uploaded = self.remote.put_segment(segment_id, self.local.segment_files(segment_id))
            if not uploaded and not self._same_as_remote(segment_id):
                self.local.remove_segment(segment_id)
        finally:
            self.release(segment_id)
        self._evict(0)  # an extraction's staged uploads stay within the bound too
        return uploaded

    def _same_as_remote(self, name: str) -> bool:
        return self.local.commit_record(name)["files"] == self.remote.commit_record(name)["files"]

    def _pin_file(self, name: str) -> Path:
        return self.local.root / "pins" / f"{validate_segment_name(name)}.lock"

    def _pin(self, name: str) -> None:
        """This process may read the segment until `release`: a shared flock on its pin file
        (taken after any eviction of it in progress has finished), counted per use."""
        import fcntl

        with self._lock:
            if name in self._pins:
                self._pins[name][1] += 1
                return
        path = self._pin_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        fcntl.flock(fh, fcntl.LOCK_SH)
        os.utime(path)  # the pin file's mtime: when the segment was last used (eviction's order)
        with self._lock:
            if name in self._pins:  # another thread pinned it meanwhile
                self._pins[name][1] += 1
                fh.close()
            else:
                self._pins[name] = [fh, 1]

    def release(self, name: str) -> None:
        """One use of a segment ends (`fetch`/`open_segment`/`segment_path` began it); with none
        left in this process it may be evicted."""
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                return
            pin[1] -= 1
            if pin[1] > 0:
                return
            del self._pins[name]
        os.utime(pin[0].name)
        pin[0].close()

    def pinned(self) -> set[str]:
        with self._lock:
            return set(self._pins)

    def fetch(self, name: str) -> Path:
        """The segment's local folder, fetched (and verified) on first use and pinned until
        `release`; a local copy that is not the remote's (another writer's bytes) is replaced."""
        self._share()
        self._pin(name)
        try:
            with self._lock:
                checked = name in self._checked
            if self.local.has_segment(name) and not checked and not self._same_as_remote(name):
                with self._alone() as alone:
                    if not alone:
                        raise CacheError(f"the mirror {self.local.root} holds another copy of segment "
                                         f"{name} than {self.url}, and another process is reading the "
                                         "mirror: rerun when it has finished, or set DISTILL_MIRROR_DIR")
                    self.local.remove_segment(name)
            if not self.local.has_segment(name):
                files = self.remote.get_segment(name)
                self._evict(sum(len(b) for b in files.values()))
                self.local.import_segment(name, files)
        except BaseException:
            self.release(name)
            raise
        with self._lock:
            self._checked.add(name)
        return self.local.root / "segments" / name

    def segment_path(self, name: str) -> Path:
        return self.fetch(name)

    def open_segment(self, name: str):
        self.fetch(name)
        try:
            return self.local.open_segment(name)
        except BaseException:
            self.release(name)
            raise

    def _evict(self, incoming: int) -> None:
        """Drop the least recently used mirrored segments that no process pins until the mirror
        holds at most `max_bytes` with `incoming` more. A segment is deleted only while its pin
        file is locked exclusively: no reader anywhere holds it, and none starts meanwhile."""
        import fcntl

        total = self.local.disk_bytes() + incoming
        if total <= self.max_bytes:
            return
        pinned, candidates = self.pinned(), []
        for p in self.local.segments():
            if p.name in pinned:
                continue
            pin = self._pin_file(p.name)
            try:  # another process may be evicting it right now
                used = pin.stat().st_mtime if pin.exists() else p.stat().st_mtime
                candidates.append((used, p.name, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())))
            except FileNotFoundError:
                continue
        (self.local.root / "pins").mkdir(exist_ok=True)
        for _, name, size in sorted(candidates):
            if total <= self.max_bytes:
                break
            with open(self._pin_file(name), "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # another process reads it
                    continue
                self.local.remove_segment(name)
                total -= size

    def remove_segment(self, name: str) -> None:
        self.remote.remove_segment(name)
        self.local.remove_segment(name)

    def disk_bytes(self) -> int:
        return self.local.disk_bytes()

    def sync(self) -> dict[str, str]:
        """Make the mirror hold exactly the remote's committed segments (for `cache ls/info/
        verify`, which then look at local files): extra local ones are dropped, missing ones
        fetched and verified. Returns the segments that could not be (name → why)."""
        names = set(self.remote.segment_names())
        with self._alone() as alone:
            if not alone:
                raise CacheError(f"another process is reading the mirror {self.local.root} of "
                                 f"{self.url}; rerun when it has finished, or set DISTILL_MIRROR_DIR "
                                 "to another directory for this command")
            for name in set(self.local.segment_names()):
                if name not in names or not self._same_as_remote(name):
                    self.local.remove_segment(name)
            failed = {}
            for name in sorted(names - set(self.local.segment_names())):
                try:
                    self.local.import_segment(name, self.remote.get_segment(name))
                except SegmentRejected as exc:  # its bytes fail verification: damaged
                    failed[name] = str(exc)
        return failed

    # ------------------------------------------------------------------ transfer (push / pull)
    def commit_record(self, name: str) -> dict:
        return self.remote.commit_record(name)

    def segment_files(self, name: str) -> dict[str, bytes]:
        return self.remote.get_segment(name)

    def import_segment(self, name: str, files: dict[str, bytes], *, max_bytes: int | None = None) -> bool:
        """Verify the segment in full (by importing it into the mirror: every chunk, key and
        checksum), then upload it. False if the remote already has it."""
        if name in set(self.remote.segment_names()):
            return False
        self._share()
        self._pin(name)  # not evicted by another process between verifying and uploading
        try:
            self.local.import_segment(name, files, max_bytes=max_bytes)
            return self.remote.put_segment(name, self.local.segment_files(name))  # the verified copy
        finally:
            self.release(name)
