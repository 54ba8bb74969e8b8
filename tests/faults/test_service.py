"""The cache service through a real server process on 127.0.0.1: a round trip that reproduces the
store byte for byte, uploads, every kind of hostile or unauthorised request refused with nothing
published (and the server still serving), concurrent readers and writers, the upload limit (busy
refusals, client retries), streamed reads and the server's memory under load, kill -9 mid-upload,
and a clean SIGTERM. Servers run as `python -m distill_pipeline.cache.service` and are stopped by PID."""
from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest

from distill_pipeline.cache.admin import gc
from benchmarks.service_load_bench import (check_nothing_lost, prepare, publish_synthetic, rss_kb, run_load,
                                           server_outcomes)
from distill_pipeline.cache.flight import (FILE_SCHEMA, MAX_TICKET_KEYS, PART_BYTES, FlightRemote, ServiceBusy,
                                           assemble_files, file_batches, record_batches)
from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.remote import MirroredStore, open_store
from distill_pipeline.cache.segment import CacheError, SegmentRejected, check_segment, segment_id
from distill_pipeline.cache.service import serve
from distill_pipeline.cache.store import Store
from tests.conftest import ROOT
from tests.invariants.helpers import make_teacher, run_extraction, tree_bytes

N_SEQ, UNIT_TOKENS = 24, 60  # 4 segments of ~9 KB per store
TOKEN, READ_TOKEN = "write-7f3a9c1e5b", "read-2d8e4f6a0c"
FIELDS = ("ids", "logp", "lse", "label_logp")


# ---------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two small stores from one teacher: `store` (served) and `other` (different sequences:
    segments to upload)."""
    root = tmp_path_factory.mktemp("service")
    teacher = make_teacher(root / "teacher")
    run_extraction(teacher, root / "store", N_SEQ, unit_tokens=UNIT_TOKENS)
    run_extraction(teacher, root / "other", N_SEQ, unit_tokens=UNIT_TOKENS, offset=1000)
    (root / "tokens").write_text(f"# writers\n{TOKEN}\n\n")
    (root / "read-tokens").write_text(f"{READ_TOKEN}\n")
    store, other = Store(root / "store"), Store(root / "other")
    return {"root": root, "store": root / "store", "other": root / "other",
            "names": store.segment_names(), "other_names": other.segment_names(),
            "files": {n: store.segment_files(n) for n in store.segment_names()},
            "other_files": {n: other.segment_files(n) for n in other.segment_names()},
            "keys": store.index_table().column("key").to_pylist()}


class Server:
    """A `python -m distill_pipeline.cache.service` process; `url` parsed from its one line."""

    def __init__(self, store: Path, log: Path, *args: str):
        self.store, self.log = store, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distill_pipeline.cache.service", "--store", str(store), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.kill()
            raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
        self.url = line.split(" at ")[-1].strip()
        assert self.url.startswith(("grpc://127.0.0.1:", "grpc+tls://127.0.0.1:")), line

    def stop(self) -> str:
        """SIGTERM by PID: must exit 0 within a few seconds. Returns its log (stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        finally:
            self.kill()
        assert rc == 0, self.log.read_text()
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


@pytest.fixture
def servers():
    """Start servers; whatever a test leaves running is killed by PID at teardown."""
    started: list[Server] = []

    def start(store: Path, log: Path, *args: str) -> Server:
        started.append(Server(store, log, *args))
        return started[-1]

    yield start
    for s in started:
        s.kill()


def copy_store(base, tmp_path: Path, name: str = "served") -> Path:
    dst = tmp_path / name
    shutil.copytree(base["store"], dst)
    return dst


def options(token: str | None) -> fl.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return fl.FlightCallOptions(headers=headers, timeout=30)


def raw_put(url: str, name: str, batches, token: str | None, schema: pa.Schema = FILE_SCHEMA) -> dict:
    """An upload with no client-side checks (names, paths, schema): what a hostile client sends."""
    client = fl.FlightClient(url)
    writer, answers = client.do_put(fl.FlightDescriptor.for_path("segment", name), schema, options(token))
    try:
        for b in batches:
            writer.write_batch(b)
        writer.done_writing()
        answer = answers.read()
    finally:
        writer.close()
    return json.loads(answer.to_pybytes())


def raw_get(url: str, ticket: bytes, token: str | None) -> pa.Table:
    return fl.FlightClient(url).do_get(fl.Ticket(ticket), options(token)).read_all()


def segment_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "segments").iterdir())


def assert_store_healthy(store: Path) -> list[str]:
    """Every published segment verifies (chunks, keys, checksums) and matches its commit record;
    nothing half-published is listed."""
    s = Store(store)
    names = s.segment_names()
    for n in names:
        s.segment_files(n)  # raises if a file differs from its record
        check = check_segment(store / "segments" / n, deep=True)
        assert not check.damaged, check.problems
    return names


def with_index_key_changed(files: dict[str, bytes]) -> dict[str, bytes]:
    t = pq.read_table(pa.BufferReader(files["index.parquet"]))
    keys = t.column("key").to_pylist()
    keys[0] = "0" * len(keys[0])
    t = t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return {**files, "index.parquet": buf.getvalue()}


def with_chunk_flipped(files: dict[str, bytes]) -> dict[str, bytes]:
    data = bytearray(files["logp/c/0/0"])
    data[len(data) // 2] ^= 0xFF
    return {**files, "logp/c/0/0": bytes(data)}


# ---------------------------------------------------------------------------- wire format (in-process)

def test_parts_split_and_reassemble():
    files = {"zarr.json": b"{}", "index.parquet": b"", "ids/c/0/0": bytes(range(256)) * 40}
    batches = list(file_batches(files, part_bytes=1000))
    assert all(sum(len(d) for d in b.column(2).to_pylist()) <= 1000 for b in batches)
    assert assemble_files(batches, "s", max_bytes=1 << 20, max_files=10) == (files, 10242)
    swapped = [batches[1], batches[0], *batches[2:]]
    with pytest.raises(SegmentRejected, match="part 1 arrived where part 0"):
        assemble_files(swapped, "s", max_bytes=1 << 20, max_files=10)
    with pytest.raises(SegmentRejected, match="over the limit of 5000 bytes"):
        assemble_files(batches, "s", max_bytes=5000, max_files=10)
    with pytest.raises(SegmentRejected, match="more than 2 files"):
        assemble_files(batches, "s", max_bytes=1 << 20, max_files=2)
    evil = pa.record_batch([pa.array(["../../evil"]), pa.array([0], pa.int32()), pa.array([b"x"])],
                           schema=FILE_SCHEMA)
    with pytest.raises(SegmentRejected, match="invalid segment file name"):
        assemble_files([evil], "s", max_bytes=1 << 20, max_files=10)


def test_client_errors_say_what_to_check():
    with pytest.raises(CacheError, match="cannot reach the cache service at grpc://127.0.0.1:1 .*cache serve"):
        FlightRemote("grpc://127.0.0.1:1", token="").segment_names()
    with pytest.raises(CacheError, match="not a cache service URL"):
        FlightRemote("http://127.0.0.1:1")
    with pytest.raises(SegmentRejected, match="invalid segment id"):
        FlightRemote("grpc://127.0.0.1:1", token="").get_segment("../x")


def test_empty_or_missing_token_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty").write_text("\n  \n# only a comment\n")
    with pytest.raises(CacheError, match="holds no token"):
        serve(tmp_path / "store", token_file=tmp_path / "empty")
    with pytest.raises(CacheError, match="cannot read the read-token file"):
        serve(tmp_path / "store", read_token_file=tmp_path / "missing")
    with pytest.raises(CacheError, match="go together"):
        serve(tmp_path / "store", tls_cert=tmp_path / "c.pem")


# ---------------------------------------------------------------------------- round trip, upload

def test_round_trip_reproduces_the_store(base, tmp_path, servers, monkeypatch):
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log", "--token-file", str(base["root"] / "tokens"))
    remote = FlightRemote(server.url, token="")  # reads are open without --read-token-file
    assert remote.segment_names() == base["names"]
    rows = lambda t: sorted(t.to_pylist(), key=lambda r: (r["key"], r["segment"]))  # noqa: E731
    assert rows(remote.index_table()) == rows(Store(base["store"]).index_table())

    fresh = Store(tmp_path / "fresh")
    for name in base["names"]:
        assert remote.commit_record(name) == Store(base["store"]).commit_record(name)
        assert fresh.import_segment(name, remote.get_segment(name)) is True
    assert tree_bytes(fresh.root) == tree_bytes(base["store"])

    monkeypatch.setenv("DISTILL_MIRROR_DIR", str(tmp_path / "mirror"))
    monkeypatch.delenv("DISTILL_CACHE_TOKEN", raising=False)
    mirrored = open_store(server.url)
    assert isinstance(mirrored, MirroredStore) and mirrored.missing(base["keys"]) == set()
    for name in base["names"]:
        mirrored.fetch(name)
    original, via_mirror = CacheReader(base["store"]), CacheReader(mirrored.local.root)
    entries = remote.entries(base["keys"] + ["0" * 64])
    assert set(entries) == set(base["keys"])  # an absent key is left out
    for key in base["keys"]:
        want = original.get(key)
        for got in (via_mirror.get(key), entries[key]):
            assert got["prompt_len"] == want["prompt_len"]
            for f in (*FIELDS, "k"):
                assert got[f].dtype == want[f].dtype and np.array_equal(got[f], want[f]), (key, f)
    assert remote.has(base["keys"][:3] + ["0" * 64]) == set(base["keys"][:3])
    assert remote.stats() == {"segments": len(base["names"]), "entries": N_SEQ}
    # commit records in bulk (`cache ls/info`): those committed, an absent name left out, and a
    # request over the limit refused by the server before it reads a record
    assert remote.commit_records(base["names"] + ["absent"]) == {
        n: Store(base["store"]).commit_record(n) for n in base["names"]}
    with pytest.raises(fl.FlightServerError, match="over the limit of 256"):
        list(fl.connect(server.url).do_action(fl.Action("commits", json.dumps(["a"] * 257).encode())))
    # key lookups ask for the keys' rows (the service reads their index partitions), never the whole index
    some = base["keys"][::7] + ["0" * 64]
    assert rows(remote.lookup(some)) == rows(Store(base["store"]).lookup(some))
    assert remote.lookup([]).num_rows == 0
    absent = [f"{i:064x}" for i in range(5000)]  # sorted first: a whole 4096-key ticket finds nothing
    assert rows(remote.lookup(absent + some)) == rows(Store(base["store"]).lookup(some))
    log = server.stop()
    gets = [line.split("action=")[1].split()[0] for line in log.splitlines() if "action=get:" in line]
    assert gets.count("get:index") == 1 and gets.count("get:rows") == 3, gets  # index_table above; lookups


def test_upload_then_again_and_sigterm_logs_each_request(base, tmp_path, servers):
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log", "--token-file", str(base["root"] / "tokens"))
    remote = FlightRemote(server.url, token=TOKEN)
    name = base["other_names"][0]
    files = base["other_files"][name]
    assert remote.put_segment(name, files) is True
    assert name in remote.segment_names()
    assert Store(served).segment_files(name) == files
    assert not check_segment(served / "segments" / name, deep=True).damaged
    assert remote.put_segment(name, files) is False             # the client sees it is there
    assert raw_put(server.url, name, file_batches(files), TOKEN) == {"published": False}  # the server too
    remote.remove_segment(name)
    assert name not in remote.segment_names() and not (served / "segments" / name).exists()
    log = server.stop()
    lines = [l for l in log.splitlines() if " peer=" in l]
    put = [l for l in lines if f"action=put segment={name} bytes={sum(map(len, files.values()))} " in l]
    assert len(put) == 1 and "status=ok" in put[0], log
    assert any("action=put:present" in l for l in lines) and any("action=remove" in l for l in lines)
    assert len([l for l in lines if "action=segments" in l]) == 4, log  # one line per request
    assert TOKEN not in log


# ---------------------------------------------------------------------------- security

@pytest.fixture(scope="module")
def guarded(base, tmp_path_factory):
    """One server for the refusal tests (none of them may publish anything): write and read
    tokens, and a segment bound of twice the largest real segment."""
    root = tmp_path_factory.mktemp("guarded")
    served = copy_store(base, root)
    largest = max(sum(map(len, f.values())) for f in base["other_files"].values())
    server = Server(served, root / "server.log", "--token-file", str(base["root"] / "tokens"),
                    "--read-token-file", str(base["root"] / "read-tokens"),
                    "--max-segment-bytes", str(2 * largest))
    yield {"server": server, "url": server.url, "store": served, "largest": largest}
    log = server.stop()
    assert TOKEN not in log and READ_TOKEN not in log


def assert_nothing_published(base, guarded) -> None:
    assert segment_dirs(guarded["store"]) == base["names"]
    assert FlightRemote(guarded["url"], token=TOKEN).segment_names() == base["names"]  # still serving
    assert not list(guarded["store"].parent.rglob("evil"))


@pytest.mark.parametrize("token, error, words", [
    (None, fl.FlightUnauthenticatedError, "needs a token"),
    ("not-a-token", fl.FlightUnauthenticatedError, "not one this cache service accepts"),
    (READ_TOKEN, fl.FlightUnauthorizedError, "read-only token"),
], ids=["no-token", "wrong-token", "read-token"])
def test_writes_without_a_write_token_are_refused(base, guarded, token, error, words):
    name = base["other_names"][0]
    with pytest.raises(error, match=words) as exc:
        raw_put(guarded["url"], name, file_batches(base["other_files"][name]), token)
    assert "DISTILL_CACHE_TOKEN" in str(exc.value)
    with pytest.raises(error, match=words):
        list(fl.FlightClient(guarded["url"]).do_action(fl.Action("remove", base["names"][0].encode()),
                                                        options(token)))
    with pytest.raises(CacheError, match=words):
        FlightRemote(guarded["url"], token=token or "").put_segment(name, base["other_files"][name])
    assert_nothing_published(base, guarded)


def test_reads_need_a_token_when_read_tokens_are_set(base, guarded):
    with pytest.raises(CacheError, match="needs a token: set DISTILL_CACHE_TOKEN"):
        FlightRemote(guarded["url"], token="").segment_names()
    with pytest.raises(fl.FlightUnauthenticatedError):
        raw_get(guarded["url"], b'{"kind": "index"}', None)
    reader = FlightRemote(guarded["url"], token=READ_TOKEN)
    assert reader.segment_names() == base["names"]
    assert reader.get_segment(base["names"][0]) == base["files"][base["names"][0]]


def hostile_uploads(base) -> dict[str, tuple[str, list, str]]:
    """case → (segment name, batches, words of the refusal)."""
    name = base["other_names"][1]
    files = base["other_files"][name]
    good = lambda f: list(file_batches(f))  # noqa: E731
    evil = pa.record_batch([pa.array(["../../evil"]), pa.array([0], pa.int32()), pa.array([b"pwned"])],
                           schema=FILE_SCHEMA)
    cases = {f"name {bad!r}": (bad, good(files), "invalid segment id")
             for bad in ("../x", "/abs", "a/b", "a\x00b", "..")}
    altered = with_index_key_changed(files)  # named after its (altered) keys: passes the id check
    altered_name = segment_id(pq.read_table(pa.BufferReader(altered["index.parquet"])).column("key").to_pylist())
    cases.update({
        "file ../../evil": (name, good(files) + [evil], "invalid segment file name"),
        "key altered": (altered_name, good(altered), "key does not match"),
        "id not its keys'": ("0" * 32, good(files), "is not the hash of its entries' keys"),
        "chunk corrupted": (name, good(with_chunk_flipped(files)), "failed verification"),
        "oversized": (name, good({**files, "ids/c/0/0": os.urandom(5 * 10**5)}), "over the limit"),
        "parts out of order": (name, list(reversed(list(file_batches({"zarr.json": b" " * 3000}, 1000)))),
                               "parts must be consecutive"),
    })
    return cases


HOSTILE = ["name '../x'", "name '/abs'", "name 'a/b'", "name 'a\\x00b'", "name '..'", "file ../../evil",
           "key altered", "id not its keys'", "chunk corrupted", "oversized", "parts out of order"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_uploads_are_refused(base, guarded, case):
    name, batches, words = hostile_uploads(base)[case]
    if case == "oversized":
        assert sum(b.nbytes for b in batches) > 2 * guarded["largest"]
    with pytest.raises(fl.FlightServerError, match=words) as exc:
        raw_put(guarded["url"], name, batches, TOKEN)
    assert "nothing was published" in str(exc.value)
    assert_nothing_published(base, guarded)


def test_wrong_schema_upload_is_refused(base, guarded):
    schema = pa.schema([("path", pa.string()), ("data", pa.binary())])
    batch = pa.record_batch([pa.array(["zarr.json"]), pa.array([b"{}"])], schema=schema)
    with pytest.raises(fl.FlightServerError, match="schema must be path: string, part: int32"):
        raw_put(guarded["url"], base["other_names"][0], [batch], TOKEN, schema=schema)
    assert_nothing_published(base, guarded)


@pytest.mark.parametrize("ticket, words", [
    (b"not json", "malformed ticket"),
    (b'{"kind": "everything"}', "unknown ticket kind"),
    (b'["index"]', "unknown ticket kind"),
    (b'{"kind": "segment", "name": "deadbeef"}', "no segment deadbeef"),
    (b'{"kind": "segment", "name": "../../etc"}', "invalid segment id"),
    (b'{"kind": "entries", "keys": "abc"}', "must be a JSON list of entry keys"),
    (json.dumps({"kind": "entries", "keys": ["k"] * (MAX_TICKET_KEYS + 1)}).encode(), "over the limit"),
    (b'{"kind": "entries", "keys": ["' + b"a" * 400_000 + b'"]}', "is too large"),
], ids=["not-json", "unknown-kind", "not-object", "unknown-segment", "traversal", "keys-not-list",
        "too-many-keys", "huge-ticket"])
def test_malformed_tickets_get_an_error(base, guarded, ticket, words):
    with pytest.raises(fl.FlightServerError, match=words):
        raw_get(guarded["url"], ticket, TOKEN)
    with pytest.raises(fl.FlightServerError, match="unknown action"):
        list(fl.FlightClient(guarded["url"]).do_action(fl.Action("drop-all", b""), options(TOKEN)))
    assert_nothing_published(base, guarded)


def test_without_token_file_every_write_is_refused(base, tmp_path, servers):
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log")
    name = base["other_names"][0]
    with pytest.raises(fl.FlightUnauthorizedError, match="started without --token-file"):
        raw_put(server.url, name, file_batches(base["other_files"][name]), TOKEN)
    with pytest.raises(CacheError, match="started without --token-file"):
        FlightRemote(server.url, token=TOKEN).remove_segment(base["names"][0])
    assert FlightRemote(server.url, token="").segment_names() == base["names"]  # reads are open
    assert segment_dirs(served) == base["names"]
    assert TOKEN not in server.stop()


# ---------------------------------------------------------------------------- concurrency, crashes

def test_concurrent_readers_and_writers(base, tmp_path, servers):
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log", "--token-file", str(base["root"] / "tokens"))
    original = CacheReader(base["store"])
    expected = {k: original.get(k) for k in base["keys"]}
    shared = FlightRemote(server.url, token="")  # one client, many threads
    errors: list[BaseException] = []
    published: dict[str, list[bool]] = {n: [] for n in base["other_names"]}
    lock = threading.Lock()

    def reader(i: int) -> None:
        try:
            for j in range(3):
                name = base["names"][(i + j) % len(base["names"])]
                assert shared.get_segment(name) == base["files"][name]
                keys = base["keys"][(i * 3) % N_SEQ:][:6]
                got = shared.entries(keys)
                assert all(np.array_equal(got[k][f], expected[k][f]) for k in keys for f in FIELDS)
        except BaseException as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    def writer(raw: bool) -> None:
        try:
            remote = FlightRemote(server.url, token=TOKEN)
            for name in base["other_names"]:
                files = base["other_files"][name]
                done = (raw_put(server.url, name, file_batches(files), TOKEN)["published"] if raw
                        else remote.put_segment(name, files))
                with lock:
                    published[name].append(done)
        except BaseException as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=writer, args=(raw,)) for raw in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert all(sorted(v) == [False, True] for v in published.values()), published  # published once
    server.stop()
    assert assert_store_healthy(served) == sorted(base["names"] + base["other_names"])
    for name in base["other_names"]:
        assert Store(served).segment_files(name) == base["other_files"][name]
    assert not list((served / "tmp").iterdir())


# ---------------------------------------------------------------------------- load: limits, streams, memory

def held_upload(url: str, name: str, files: dict[str, bytes]):
    """An upload that sent its first part and waits: it holds one of the server's upload slots.
    Returns its writer, its answer reader and the parts not sent yet."""
    writer, answers = fl.FlightClient(url).do_put(fl.FlightDescriptor.for_path("segment", name), FILE_SCHEMA,
                                                  options(TOKEN))
    parts = list(file_batches(files, part_bytes=256))
    writer.write_batch(parts[0])
    return writer, answers, parts[1:]


def test_uploads_beyond_the_limit_wait_then_are_refused_busy_and_retried(base, tmp_path, servers):
    """One upload slot, held by a stalled upload: another upload waits --upload-wait-s, then is
    refused before anything of it is read (FlightUnavailableError, extra_info b"busy"); the client
    retries with backoff and says so when it gives up; once the slot is free the retry publishes."""
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log", "--token-file", str(base["root"] / "tokens"),
                     "--max-concurrent-uploads", "1", "--upload-wait-s", "0.5")
    held, other = base["other_names"][:2]
    writer, answers, rest = held_upload(server.url, held, base["other_files"][held])
    time.sleep(1.5)  # the server has taken the held upload's first part: its one slot is taken
    t0 = time.monotonic()
    refusal = r"busy: .*--max-concurrent-uploads.* waited 0\.5 s"
    with pytest.raises(fl.FlightUnavailableError, match=refusal) as exc:
        raw_put(server.url, other, file_batches(base["other_files"][other]), TOKEN)
    assert exc.value.extra_info == b"busy" and 0.4 < time.monotonic() - t0 < 10
    impatient = FlightRemote(server.url, token=TOKEN, busy_retries=1, busy_backoff_s=0.1)
    gave_up = "is busy.* refused 2 time.*nothing was published.*--max-concurrent-uploads"
    with pytest.raises(ServiceBusy, match=gave_up):
        impatient.put_segment(other, base["other_files"][other])
    assert segment_dirs(served) == base["names"]  # nothing refused was published

    outcome: dict = {}

    def patient() -> None:
        try:
            remote = FlightRemote(server.url, token=TOKEN, busy_backoff_s=0.2)
            outcome["published"] = remote.put_segment(other, base["other_files"][other])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    retrying = threading.Thread(target=patient)
    retrying.start()
    time.sleep(1.5)  # refused at least once by now (0.5 s wait each), retrying with backoff
    assert not outcome
    for b in rest:
        writer.write_batch(b)
    writer.done_writing()
    assert json.loads(answers.read().to_pybytes()) == {"published": True}
    writer.close()
    retrying.join(60)
    assert outcome == {"published": True}, outcome
    log = server.stop()
    busy = [l for l in log.splitlines() if f"action=put segment={other} " in l
            and "status=refused (FlightUnavailableError: the cache service is busy" in l]
    assert len(busy) >= 4 and all(" queued_ms=" in l for l in busy), log  # raw, impatient ×2, patient ≥ 1
    assert assert_store_healthy(served) == sorted(base["names"] + [held, other])


def test_a_served_segment_is_checked_against_its_commit_record(base, tmp_path, servers):
    """Streamed file by file, a segment is still checked against its commit record: a file
    changed in the store (same size) ends the stream with a 'rejected' error before it is sent."""
    served = copy_store(base, tmp_path)
    name, intact = base["names"][:2]
    chunk = served / "segments" / name / "logp" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    server = servers(served, tmp_path / "server.log")
    sent: list[str] = []
    ticket = fl.Ticket(json.dumps({"kind": "segment", "name": name}).encode())
    damaged = "logp/c/0/0 does not match its commit record.*gc --damaged"
    with pytest.raises(fl.FlightServerError, match=damaged) as exc:
        for part in fl.FlightClient(server.url).do_get(ticket, options(None)):
            sent += part.data.column("path").to_pylist()
    assert exc.value.extra_info == b"rejected" and "logp/c/0/0" not in sent
    remote = FlightRemote(server.url, token="")
    with pytest.raises(SegmentRejected, match="does not match its commit record"):
        remote.get_segment(name)
    assert remote.get_segment(intact) == base["files"][intact]  # still serving
    server.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A store of one valid synthetic segment of ~24 MB (K = 50, ~145k tokens): reads of it are
    large next to the server's baseline memory."""
    root = tmp_path_factory.mktemp("big")
    store = Store(root / "store")
    name = publish_synthetic(store, 7, 24.0)
    manifest = store.commit_record(name)["manifest"]
    return {"store": root / "store", "name": name, "files": store.segment_files(name),
            "keys": store.index_table().column("key").to_pylist(), "n_tokens": int(manifest["n_tokens"]),
            "top_k": int(manifest["format"]["top_k"])}


def test_segment_and_entries_reads_are_streamed_not_built_whole(big, tmp_path, servers):
    """4 fetches of a 24 MB segment and 2 of all its entries (59 MB as Arrow), each client taking
    its first batch and then waiting until every stream has started, so all six are under way at
    once: the server's peak RSS grows by the decoded chunks its entry reader caches plus a few parts
    per stream — not by a copy of each answer (built whole before sending, the six answers are
    ~215 MB: measured +230 MiB)."""
    server = servers(big["store"], tmp_path / "server.log")
    warm = FlightRemote(server.url, token="")
    assert set(warm.entries(big["keys"][:1])) == set(big["keys"][:1])  # imports, the entry reader
    baseline = rss_kb(server.proc.pid)
    tickets = [{"kind": "segment", "name": big["name"]}] * 4 + [{"kind": "entries", "keys": big["keys"]}] * 2
    started = threading.Barrier(len(tickets))
    got: dict[int, list[pa.RecordBatch]] = {}
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            reader = fl.FlightClient(server.url).do_get(fl.Ticket(json.dumps(tickets[i]).encode()), options(None))
            got[i] = [reader.read_chunk().data]
            started.wait(60)  # every request is under way: what each holds on the server, it holds now
            got[i] += list(record_batches(reader))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(tickets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    growth = (rss_kb(server.proc.pid, "VmHWM") - baseline) << 10
    server.stop()
    assert not errors, errors
    for i, batches in got.items():
        if tickets[i]["kind"] == "segment":
            assert assemble_files(batches, big["name"], max_bytes=1 << 30, max_files=1000)[0] == big["files"]
        else:
            assert sorted(k for b in batches for k in b.column("key").to_pylist()) == sorted(big["keys"])
            assert all(b.nbytes <= PART_BYTES + (1 << 20) for b in batches)
    decoded = big["n_tokens"] * (big["top_k"] * 6 + 8)  # every chunk, once, in the entry reader's LRU
    bound = decoded + len(tickets) * 3 * PART_BYTES + (32 << 20)  # + a part being read, built, sent; + slack
    print(f"server RSS growth {growth >> 20} MiB, bound {bound >> 20} MiB")
    assert growth < bound, f"server RSS grew {growth >> 20} MiB, over {bound >> 20} MiB"


LOAD_LIMIT, LOAD_READERS, LOAD_WRITERS, LOAD_SEGMENT_MB = 1, 4, 4, 24.0


def test_load_nothing_lost_and_server_memory_bounded(tmp_path, servers):
    """4 readers (has, entries, segment) + 4 writers (new 24 MB segments) for 6 s against a server
    taking one upload at a time (the others wait 0.5 s, then are refused busy; the client retries):
    every request succeeds or is refused busy, every upload is listed and verifies, every read
    matches, and the server's peak RSS stays within what the limit allows (see `bound`)."""
    fx = prepare(tmp_path, segment_mb=LOAD_SEGMENT_MB, base_segments=2, base_mb=1.0)
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = servers(fx.store, tmp_path / "server.log", "--token-file", str(tmp_path / "tokens"),
                     "--max-concurrent-uploads", str(LOAD_LIMIT), "--upload-wait-s", "0.5")
    res = run_load(server.url, server.proc.pid, fx, readers=LOAD_READERS, writers=LOAD_WRITERS, duration=6.0,
                   token=TOKEN, busy_backoff_s=0.2)
    problems = check_nothing_lost(server.url, fx.store, fx, res)
    outcomes = server_outcomes(server.stop())
    assert not res.failures and not res.mismatches and not problems, (res.failures, res.mismatches, problems)
    assert outcomes["other"] == 0 and outcomes["ok"] > 0, outcomes
    assert len(res.uploaded) >= 2 and all(res.latencies[k] for k in ("has", "entries", "segment")), res.latencies
    # Memory over the baseline (after warm-up reads): the uploads being received and verified —
    # LOAD_LIMIT × one upload's working set, measured alone first (its bytes, its decoded arrays,
    # the commit record's read-back: ~4.7× a 24 MB segment); each upload waiting for a slot — what
    # HTTP/2 flow control lets its client send ahead, ≤ 2 parts (measured: 8 MiB); each read
    # stream — a part being read, built and sent, ≤ 3 parts; and 80 MiB for the allocator and the
    # entry reader's LRU over the 2 MB base store (64 MiB once measured 247 MiB of growth against a
    # 246 MiB bound, with another test suite loading the machine). Without the limit the 4 uploads
    # overlap (measured: +404 MiB).
    waiting = (LOAD_WRITERS - LOAD_LIMIT) * 2 * PART_BYTES
    bound = LOAD_LIMIT * (res.solo_upload_kb << 10) + waiting + LOAD_READERS * 3 * PART_BYTES + (80 << 20)
    growth = (res.hwm_kb - res.rss_baseline_kb) << 10
    print(f"uploads {len(res.uploaded)}, server requests {outcomes}, one upload alone "
          f"{res.solo_upload_kb >> 10} MiB, RSS growth {growth >> 20} MiB, bound {bound >> 20} MiB")
    assert res.solo_upload_kb << 10 > 3 * fx.template_bytes  # an upload's working set is its size, and more
    assert growth < bound, f"server RSS grew {growth >> 20} MiB, over {bound >> 20} MiB"


def test_kill_9_mid_upload_publishes_nothing_half(base, tmp_path, servers):
    served = copy_store(base, tmp_path)
    args = ("--token-file", str(base["root"] / "tokens"))
    server = servers(served, tmp_path / "server.log", *args)
    slow, *others = base["other_names"]
    client = fl.FlightClient(server.url)
    writer, _ = client.do_put(fl.FlightDescriptor.for_path("segment", slow), FILE_SCHEMA, options(TOKEN))
    parts = list(file_batches(base["other_files"][slow], part_bytes=256))
    for b in parts[:len(parts) // 2]:
        writer.write_batch(b)
    stop = threading.Event()

    def upload_loop() -> None:  # publish the others, remove them, again, until the server dies
        remote = FlightRemote(server.url, token=TOKEN)
        while not stop.is_set():
            try:
                for name in others:
                    assert raw_put(server.url, name, file_batches(base["other_files"][name]), TOKEN)["published"]
                for name in others:
                    remote.remove_segment(name)
            except (fl.FlightError, pa.ArrowException, CacheError):
                return

    loop = threading.Thread(target=upload_loop)
    loop.start()
    deadline = time.time() + 60  # until uploads are under way (a loaded machine takes seconds)
    while "action=put " not in (tmp_path / "server.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    server.kill()  # SIGKILL by PID
    stop.set()
    loop.join(30)
    assert not loop.is_alive()
    with pytest.raises((fl.FlightError, pa.ArrowException)):
        for b in parts[len(parts) // 2:]:
            writer.write_batch(b)
        writer.done_writing()
        writer.close()

    assert "status=ok" in (tmp_path / "server.log").read_text()  # uploads were under way
    names = assert_store_healthy(served)
    assert slow not in names and slow not in segment_dirs(served)
    assert set(names) <= set(base["names"] + base["other_names"])
    gc(Store(served), older_than_s=0)  # what the killed server left under tmp/
    assert not [p for p in (served / "tmp").iterdir() if p.is_dir()]
    server = servers(served, tmp_path / "server2.log", *args)
    remote = FlightRemote(server.url, token=TOKEN)
    assert remote.segment_names() == names
    for name in base["other_names"]:
        assert remote.put_segment(name, base["other_files"][name]) is (name not in names)
    server.stop()
    assert assert_store_healthy(served) == sorted(base["names"] + base["other_names"])


def test_tls(base, tmp_path, servers, monkeypatch):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    server = servers(copy_store(base, tmp_path), tmp_path / "server.log", "--tls-cert", str(cert),
                     "--tls-key", str(key))
    assert server.url.startswith("grpc+tls://127.0.0.1:")
    monkeypatch.setenv("DISTILL_CACHE_TLS_CA", str(cert))
    assert FlightRemote(server.url, token="").segment_names() == base["names"]
    with pytest.raises(CacheError, match="cannot reach the cache service"):
        FlightRemote(server.url.replace("grpc+tls://", "grpc://"), token="", timeout=10).segment_names()
    server.stop()


def test_sigterm_with_a_stalled_upload_still_exits_0(base, tmp_path, servers):
    """A client that stops sending mid-upload cannot hold the server up: after the grace period
    it exits 0 anyway, and nothing of the upload was published."""
    served = copy_store(base, tmp_path)
    server = servers(served, tmp_path / "server.log", "--token-file", str(base["root"] / "tokens"))
    name = base["other_names"][0]
    writer, _ = fl.FlightClient(server.url).do_put(fl.FlightDescriptor.for_path("segment", name),
                                                   FILE_SCHEMA, options(TOKEN))
    writer.write_batch(next(file_batches(base["other_files"][name], part_bytes=256)))
    assert FlightRemote(server.url, token="").segment_names() == base["names"]  # the put is in flight
    t0 = time.monotonic()
    log = server.stop()
    # the handler is blocked on the stalled stream (the grace period runs out), or — under load —
    # it took its first message only after the stop began and refused it at once: either way the
    # server exits promptly
    assert time.monotonic() - t0 < 14
    assert "requests still in flight" in log or "shutting down; upload again when it is back" in log, log
    assert segment_dirs(served) == base["names"]
