"""The cache service under load: N reader and M writer clients against one server process on
127.0.0.1 (`python -m distill_pipeline.cache.service`, stopped by its PID).

- readers (one FlightRemote each, in threads of this process) cycle through `has` (256 keys
  present + 16 absent), `entries` (32 keys) and `segment` (a whole segment, checked against its
  commit record), comparing every answer with what the store holds;
- writers upload new valid segments (`put_segment`, which retries a busy refusal with backoff):
  one template segment per writer whose index is rewritten with new prompts for every upload, so
  each upload is a distinct segment (new keys, new id) that passes the server's full verification;
- the server's RSS is sampled every 50 ms (/proc/<pid>/status VmRSS) and its VmHWM read at the end.

Afterwards nothing may be lost: every uploaded segment is listed, its commit record matches the
bytes sent, and it verifies in full (every chunk, key and checksum) in the server's store; every
read returned what was written. Prints one line per figure:

    python benchmarks/service_load_bench.py                       # 8 readers, 4 writers, 30 s
    python benchmarks/service_load_bench.py --readers 4 --writers 4 --duration 10 \\
        --segment-mb 8 --max-concurrent-uploads 1 --upload-wait-s 0.5

Clients and server share this machine's cores (and the clients one Python process): the figures
are the service's behaviour under contention on loopback, not its capacity on its own hardware.
`tests/faults/test_service.py::test_load_nothing_lost_and_server_memory_bounded` runs the same
load, small, with assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = "synthetic-load-teacher"
TOKEN = "load-bench-write-token"
TOP_K, VOCAB, ENTRY_TOKENS, PROMPT_LEN = 50, 32_000, 512, 16
STORED_BYTES_PER_TOKEN = 166  # what a synthetic token costs on disk (K = 50, float16), measured
KINDS = ("has", "entries", "segment", "put")


# ---------------------------------------------------------------------------- segments

def publish_synthetic(store, seed: int, mb: float) -> str:
    """Publish one valid synthetic segment of about `mb` MB on disk into `store` (a `Store`):
    random top-K rows (descending log-probs), entries of ENTRY_TOKENS response tokens whose keys
    are computed as an extraction computes them. Returns its name."""
    import numpy as np

    from distill_pipeline.cache.extract import segment_data
    from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat
    from distill_pipeline.cache.segment import segment_id
    from distill_pipeline.identity import IDENTITY_VERSION

    rng = np.random.default_rng(seed)
    fmt = CacheFormat(TOP_K, "float16")
    n_entries = max(1, round(mb * 1e6 / STORED_BYTES_PER_TOKEN / ENTRY_TOKENS))
    entries = []
    for i in range(n_entries):
        ids = rng.integers(0, VOCAB, PROMPT_LEN + ENTRY_TOKENS).tolist()
        entries.append({"key": fmt.key(TEACHER, ids, PROMPT_LEN), "teacher": TEACHER, "offset": i * ENTRY_TOKENS,
                        "n_tokens": ENTRY_TOKENS, "prompt_len": PROMPT_LEN, "token_ids": ids})
    n = n_entries * ENTRY_TOKENS
    ids = rng.integers(0, VOCAB, (n, TOP_K), dtype=np.int32)
    logp = -np.sort(rng.exponential(2.0, (n, TOP_K)).astype(np.float32), axis=1)  # descending, ≤ 0
    lse = rng.normal(size=n).astype(np.float32)
    label = (logp[:, -1] - rng.exponential(1.0, n)).astype(np.float32)
    data, kl = segment_data(fmt, ids, logp, lse, label, entries, VOCAB)
    manifest = {"schema_version": SCHEMA_VERSION, "identity_version": IDENTITY_VERSION, "teacher": TEACHER,
                "format": fmt.to_json(), "n_entries": n_entries, "n_tokens": n, "reconstruction_kl": kl,
                "versions": {}}
    name = segment_id([e["key"] for e in entries])
    store.publish(name, data, manifest)
    return name


def variant(template: dict[str, bytes], tag: int) -> tuple[str, dict[str, bytes]]:
    """A new valid segment from a template's files: the same arrays (so the same checksums), new
    prompt tokens in its index, hence new keys and a new id. Deterministic in `tag`."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill_pipeline.cache.segment import segment_format, segment_id

    fmt = segment_format(json.loads(template["zarr.json"])["attributes"])
    table = pq.read_table(pa.BufferReader(template["index.parquet"]))
    rng = np.random.default_rng(1_000_003 + tag)
    token_ids, keys = [], []
    for ids, p, teacher in zip(table.column("token_ids").to_pylist(), table.column("prompt_len").to_pylist(),
                               table.column("teacher").to_pylist()):
        ids = rng.integers(0, VOCAB, p).tolist() + ids[p:]
        token_ids.append(ids)
        keys.append(fmt.key(teacher, ids, p))
    schema = table.schema
    table = table.set_column(schema.get_field_index("key"), schema.field("key"),
                             pa.array(keys, schema.field("key").type))
    table = table.set_column(schema.get_field_index("token_ids"), schema.field("token_ids"),
                             pa.array(token_ids, schema.field("token_ids").type))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return segment_id(keys), {**template, "index.parquet": buf.getvalue()}


@dataclass
class Fixture:
    """What a load run needs: the served store (base segments in it), the writers' templates, and
    the expected answers to every read."""
    store: Path
    base: dict[str, dict[str, bytes]]          # name → files
    keys: list[str]
    expected: dict[str, dict]                  # key → CacheReader.get(key)
    templates: list[dict[str, bytes]]          # writer w uploads variants of templates[w % len]
    template_bytes: int

    def template(self, tag: int) -> dict[str, bytes]:
        return self.templates[(tag // 1_000_000) % len(self.templates)]


def prepare(root: Path, *, segment_mb: float, base_segments: int, base_mb: float, templates: int = 1) -> Fixture:
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.cache.store import Store

    store = Store(root / "served")
    names = [publish_synthetic(store, 1 + i, base_mb) for i in range(base_segments)]
    base = {n: store.segment_files(n) for n in names}
    keys = store.index_table().column("key").to_pylist()
    reader = CacheReader(store)
    expected = {k: reader.get(k) for k in keys}
    staging = Store(root / "templates")
    made = [staging.segment_files(publish_synthetic(staging, 10_000 + t, segment_mb)) for t in range(templates)]
    shutil.rmtree(root / "templates")
    size = max(sum(map(len, t.values())) for t in made)
    return Fixture(store.root, base, keys, expected, made, size)


# ---------------------------------------------------------------------------- server

class ServerProcess:
    """`python -m distill_pipeline.cache.service` on 127.0.0.1, any free port; stopped by PID."""

    def __init__(self, store: Path, log: Path, token_file: Path, *args: str):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "distill_pipeline.cache.service", "--store", str(store), "--host",
                 "127.0.0.1", "--port", "0", "--token-file", str(token_file), *args],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.kill()
            raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.url = line.split(" at ")[-1].strip()
        self.pid = self.proc.pid

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            finally:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


# ---------------------------------------------------------------------------- load

@dataclass
class LoadResult:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    bytes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    failures: list[str] = field(default_factory=list)      # anything but ok / busy (client side)
    mismatches: list[str] = field(default_factory=list)    # a read that returned something else
    gave_up_busy: int = 0                                  # put_segment that ran out of retries
    uploaded: dict[str, int] = field(default_factory=dict)  # name → variant tag
    rss_baseline_kb: int = 0
    rss_peak_sampled_kb: int = 0
    hwm_kb: int = 0
    solo_upload_kb: int = 0                                # VmHWM growth of one upload alone

    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def run_load(url: str, server_pid: int, fx: Fixture, *, readers: int, writers: int, duration: float,
             token: str = TOKEN, busy_backoff_s: float = 0.5) -> LoadResult:
    """Readers and writers for `duration` seconds, after a warm-up read of each kind (then the
    server's VmRSS is the baseline) and one upload alone (its VmHWM growth: one upload's working
    set). Every failure is collected, none raised."""
    import numpy as np

    from distill_pipeline.cache.flight import FlightRemote, ServiceBusy
    from distill_pipeline.cache.segment import CacheError

    res = LoadResult(seconds=duration)
    lock = threading.Lock()
    names = sorted(fx.base)
    absent = [f"{i:064x}" for i in range(16)]

    def read_once(remote, kind: str, i: int) -> int:
        """One read; returns the bytes it moved, records a mismatch."""
        if kind == "has":
            sample = [fx.keys[(i * 37 + j) % len(fx.keys)] for j in range(min(256, len(fx.keys)))]
            got = remote.has(sample + absent)
            if got != set(sample):
                res.mismatches.append(f"has #{i}: {len(set(sample) - got)} of {len(set(sample))} present keys "
                                      f"missing, {len(got - set(sample))} absent keys reported")
            return 0
        if kind == "entries":
            n = min(32, len(fx.keys))
            sample = list(dict.fromkeys(fx.keys[(i * 13 + j) % len(fx.keys)] for j in range(n)))
            got = remote.entries(sample)
            moved = 0
            for k in sample:
                want, have = fx.expected[k], got.get(k)
                if have is None or have["prompt_len"] != want["prompt_len"] or not all(
                        np.array_equal(have[f], want[f]) for f in ("ids", "logp", "lse", "label_logp")):
                    res.mismatches.append(f"entries #{i}: {k[:12]}")
                moved += sum(have[f].nbytes for f in ("ids", "logp", "lse", "label_logp")) if have else 0
            return moved
        name = names[i % len(names)]
        files = remote.get_segment(name)
        if files != fx.base[name]:
            res.mismatches.append(f"segment #{i}: {name}")
        return sum(map(len, files.values()))

    warm = FlightRemote(url, token="")
    for kind in ("has", "entries", "segment"):
        read_once(warm, kind, 0)
    res.rss_baseline_kb = rss_kb(server_pid)
    solo_tag = 999_999  # writer 0's namespace, past any upload of the loop
    name, files = variant(fx.template(solo_tag), solo_tag)
    if FlightRemote(url, token=token).put_segment(name, files):
        res.uploaded[name] = solo_tag
    res.solo_upload_kb = rss_kb(server_pid, "VmHWM") - res.rss_baseline_kb
    peak = [res.rss_baseline_kb]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], rss_kb(server_pid))
            except (OSError, RuntimeError):
                return

    def reader(r: int) -> None:
        remote = FlightRemote(url, token="")
        i = r
        while not stop.is_set():
            kind = ("has", "entries", "segment")[i % 3]
            t = time.perf_counter()
            try:
                moved = read_once(remote, kind, i)
            except CacheError as exc:
                with lock:
                    res.failures.append(f"{kind}: {exc}")
                continue
            finally:
                i += 1
            with lock:
                res.latencies[kind].append(time.perf_counter() - t)
                res.bytes[kind] += moved

    def writer(w: int) -> None:
        remote = FlightRemote(url, token=token, busy_backoff_s=busy_backoff_s)
        n = 0
        while not stop.is_set():
            tag = w * 1_000_000 + n
            name, files = variant(fx.template(tag), tag)
            t = time.perf_counter()
            try:
                published = remote.put_segment(name, files)
            except ServiceBusy:  # refused every retry: the documented retryable refusal; sent again
                with lock:
                    res.gave_up_busy += 1
                continue
            except CacheError as exc:
                with lock:
                    res.failures.append(f"put {name}: {exc}")
                n += 1
                continue
            with lock:
                res.latencies["put"].append(time.perf_counter() - t)
                res.bytes["put"] += sum(map(len, files.values()))
                res.uploaded[name] = tag
                if not published:
                    res.failures.append(f"put {name}: the service already had a segment never uploaded before")
            n += 1

    threads = [threading.Thread(target=sample_rss)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    threads += [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(180)  # a request in flight finishes (an upload retrying busy refusals: ≤ ~80 s)
    res.seconds = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        res.failures.append("a client thread did not finish within 180 s of the end")
    res.rss_peak_sampled_kb = peak[0]
    res.hwm_kb = rss_kb(server_pid, "VmHWM")
    return res


def check_nothing_lost(url: str, store: Path, fx: Fixture, res: LoadResult) -> list[str]:
    """Every uploaded segment listed by the service, its commit record that of the bytes sent,
    and (in the store, read directly) verifying in full. Returns the problems (none: nothing lost)."""
    from distill_pipeline.cache.flight import FlightRemote
    from distill_pipeline.cache.segment import check_segment, record_for

    remote = FlightRemote(url, token="")
    listed = set(remote.segment_names())
    problems = [f"base segment {n} not listed" for n in fx.base if n not in listed]
    for name, tag in res.uploaded.items():
        _, files = variant(fx.template(tag), tag)
        if name not in listed:
            problems.append(f"uploaded {name} not listed")
            continue
        if remote.commit_record(name)["files"] != record_for(name, files)["files"]:
            problems.append(f"uploaded {name}: its commit record differs from the bytes sent")
        check = check_segment(store / "segments" / name, deep=True)
        if check.damaged:
            problems.append(f"uploaded {name} does not verify: {check.problems[:2]}")
    return problems


def server_outcomes(log: str) -> dict[str, int]:
    """Request log lines by outcome: ok, busy (the documented retryable refusal), other."""
    out = {"ok": 0, "busy": 0, "other": 0}
    for line in log.splitlines():
        if " peer=" not in line:
            continue
        status = line.split(" status=", 1)[-1]
        out["ok" if status == "ok" else "busy" if "the cache service is busy" in status else "other"] += 1
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--segment-mb", type=float, default=4.0, help="size of each uploaded segment")
    ap.add_argument("--base-segments", type=int, default=4, help="segments the readers read")
    ap.add_argument("--base-mb", type=float, default=2.0, help="size of each of those")
    ap.add_argument("--max-concurrent-uploads", type=int, default=None, help="server option (default: its own)")
    ap.add_argument("--upload-wait-s", type=float, default=None, help="server option (default: its own)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (store, server log)")
    args = ap.parse_args()
    os.environ.setdefault("DISTILL_PROGRESS", "0")
    server_args = []
    if args.max_concurrent_uploads is not None:
        server_args += ["--max-concurrent-uploads", str(args.max_concurrent_uploads)]
    if args.upload_wait_s is not None:
        server_args += ["--upload-wait-s", str(args.upload_wait_s)]
    d = Path(tempfile.mkdtemp(prefix="service-load-"))
    try:
        t = time.perf_counter()
        fx = prepare(d, segment_mb=args.segment_mb, base_segments=args.base_segments, base_mb=args.base_mb)
        (d / "tokens").write_text(TOKEN + "\n")
        base_mb = sum(sum(map(len, f.values())) for f in fx.base.values()) / 1e6
        print(f"setup                {time.perf_counter() - t:.1f} s: {len(fx.base)} base segments "
              f"({base_mb:.1f} MB, {len(fx.keys)} entries), uploads of {fx.template_bytes / 1e6:.1f} MB",
              flush=True)
        server = ServerProcess(fx.store, d / "server.log", d / "tokens", *server_args)
        try:
            res = run_load(server.url, server.pid, fx, readers=args.readers, writers=args.writers,
                           duration=args.duration)
            problems = check_nothing_lost(server.url, fx.store, fx, res)
        finally:
            rc = server.stop()
        outcomes = server_outcomes((d / "server.log").read_text())
        limit = next((ln for ln in (d / "server.log").read_text().splitlines() if "uploads: at most" in ln), "")
        print(f"config               {args.readers} readers, {args.writers} writers, {args.duration:g} s; server "
              + (limit.split("uploads: ", 1)[-1] if limit else "?"))
        n, secs = res.requests(), res.seconds
        moved = sum(res.bytes.values())
        print(f"requests             {n} in {secs:.1f} s: {n / secs:.1f}/s")
        print(f"throughput           {moved / 1e6:.1f} MB: {moved / 1e6 / secs:.1f} MB/s "
              f"(read {sum(v for k, v in res.bytes.items() if k != 'put') / 1e6 / secs:.1f}, "
              f"upload {res.bytes['put'] / 1e6 / secs:.1f})")
        for kind in KINDS:
            lat = res.latencies[kind]
            print(f"{kind:<20} {len(lat)} ({len(lat) / secs:.1f}/s, {res.bytes[kind] / 1e6 / secs:.1f} MB/s): "
                  f"p50 {1000 * percentile(lat, 50):.0f} ms, p99 {1000 * percentile(lat, 99):.0f} ms")
        print(f"server requests      {sum(outcomes.values())} logged: {outcomes['ok']} ok, {outcomes['busy']} "
              f"refused busy (retried by the client), {outcomes['other']} other; "
              f"{res.gave_up_busy} upload(s) out of retries")
        print(f"server RSS           baseline {res.rss_baseline_kb / 1024:.0f} MiB (after warm-up reads); one "
              f"upload alone +{res.solo_upload_kb / 1024:.0f} MiB; peak under load {res.hwm_kb / 1024:.0f} MiB "
              f"(VmHWM; sampled VmRSS peak {res.rss_peak_sampled_kb / 1024:.0f} MiB)")
        lost = problems + res.mismatches + res.failures
        print(f"lost                 {len(lost)} ({len(res.uploaded)} uploads listed and verified, "
              f"every read compared; server exit {rc})" + "".join(f"\n  {p}" for p in lost[:10]))
        return 1 if lost or outcomes["other"] or rc != 0 else 0
    finally:
        if args.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
