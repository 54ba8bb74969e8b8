"""Content identity of a model directory (`distill_pipeline/identity.py`): what counts, what does
not, the memo's re-validation, hub-cache snapshots, and the cost of a repeated call."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from distill_pipeline import identity
from distill_pipeline.identity import MEMO_NAME, compute_identity, content_identity, forget
from distill_pipeline.models import teacher_identity


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec

    spec = ModelSpec(preset="tiny-student")
    folder = tmp_path_factory.mktemp("identity") / "saved"
    save_model(load_model(spec, seed=0), load_tokenizer(spec), folder)
    return folder


@pytest.fixture
def model(saved, tmp_path) -> Path:
    """A private copy (with the memo save_model wrote) and a clean in-memory memo."""
    forget()
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    yield folder
    forget()


def fresh(folder: Path) -> str:
    """What another process would compute: in-memory memo dropped, memo file (if any) read."""
    forget()
    return teacher_identity(folder)


def _edit_json(f: Path, **changes) -> None:
    data = json.loads(f.read_text())
    data.update(changes)
    f.write_text(json.dumps(data, indent=2))


def _flip_one_weight(f: Path) -> None:
    """Add 1 to the first element of the first tensor, in place: same size, same header."""
    with open(f, "r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        name = sorted(k for k in header if k != "__metadata__")[0]
        assert header[name]["dtype"] == "F32"
        pos = 8 + n + header[name]["data_offsets"][0]
        fh.seek(pos)
        (x,) = struct.unpack("<f", fh.read(4))
        fh.seek(pos)
        fh.write(struct.pack("<f", x + 1.0))


def test_saved_model_has_a_valid_memo_and_identity_is_deterministic(saved, model):
    ident = teacher_identity(model)
    assert len(ident) == 64 and int(ident, 16) >= 0
    assert ident == teacher_identity(model) == fresh(model) == compute_identity(model)
    assert (saved / MEMO_NAME).is_file() and not (saved / ".identity").exists()
    assert teacher_identity(saved) == ident  # same content, other path


def test_copy_elsewhere_same_identity_with_or_without_memo(model, tmp_path):
    ident = teacher_identity(model)
    bare = tmp_path / "elsewhere" / "deeper" / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns(MEMO_NAME))
    assert fresh(bare) == ident
    moved = tmp_path / "moved"
    os.rename(model, moved)
    assert fresh(moved) == ident


def test_readme_generation_config_original_and_memo_do_not_count(model):
    ident = teacher_identity(model)
    (model / "README.md").write_text("# my teacher\n")
    _edit_json(model / "generation_config.json", max_length=7, temperature=0.3)
    (model / "original").mkdir()
    shutil.copy(model / "model.safetensors", model / "original" / "consolidated.safetensors")
    shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")
    (model / "notes.txt").write_text("x")
    assert teacher_identity(model) == ident == fresh(model) == compute_identity(model)
    (model / MEMO_NAME).unlink()
    assert fresh(model) == ident


@pytest.mark.parametrize("restore_mtime", [False, True])
@pytest.mark.parametrize("in_process", [False, True])
def test_one_weight_changed_in_place_changes_identity(model, restore_mtime, in_process):
    ident = teacher_identity(model)
    f = model / "model.safetensors"
    st = f.stat()
    time.sleep(0.06)  # past the racy window: the old digest is memoised and trusted by stat
    assert teacher_identity(model) == ident
    memo = json.loads((model / MEMO_NAME).read_text())
    assert memo["files"]["model.safetensors"]["stat"][0] == st.st_size
    _flip_one_weight(f)
    if restore_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert f.stat().st_size == st.st_size
    assert (model / MEMO_NAME).is_file()  # an old memo is present
    new = teacher_identity(model) if in_process else fresh(model)
    assert new != ident
    assert new == compute_identity(model) == teacher_identity(model) == fresh(model)


def test_chat_template_counts(model):
    ident = teacher_identity(model)
    t = model / "chat_template.jinja"
    t.write_text(t.read_text().replace("<|end|>", "<|end|>\n"))
    assert teacher_identity(model) != ident
    assert teacher_identity(model) == compute_identity(model)


def test_template_in_tokenizer_config_counts(model):
    (model / "chat_template.jinja").unlink()
    _edit_json(model / "tokenizer_config.json", chat_template="{{ messages }}")
    a = teacher_identity(model)
    _edit_json(model / "tokenizer_config.json", chat_template="{{ messages }}!")
    assert teacher_identity(model) != a


def test_config_fields_that_change_the_forward_pass_count_others_do_not(model):
    ident = teacher_identity(model)
    cfg = model / "config.json"
    original = cfg.read_text()
    _edit_json(cfg, transformers_version="9.99.0", _name_or_path="/somewhere/else", use_cache=False)
    assert teacher_identity(model) == ident
    data = json.loads(original)
    cfg.write_text(json.dumps(dict(reversed(list(data.items())))))  # key order, formatting
    assert teacher_identity(model) == ident
    _edit_json(cfg, rms_norm_eps=json.loads(original)["rms_norm_eps"] * 10)
    assert teacher_identity(model) != ident
    cfg.write_text(original)
    assert teacher_identity(model) == ident


def test_config_dtype_counts_under_either_spelling(model):
    cfg = model / "config.json"
    data = json.loads(cfg.read_text())
    data.pop("dtype", None)
    data["torch_dtype"] = "float32"
    cfg.write_text(json.dumps(data))
    ident = teacher_identity(model)
    data["dtype"] = data.pop("torch_dtype")  # transformers >= 4.56 writes `dtype`
    cfg.write_text(json.dumps(data))
    assert teacher_identity(model) == ident
    data["dtype"] = "bfloat16"  # dtype="auto" loading computes in it: other log-probs
    cfg.write_text(json.dumps(data))
    assert teacher_identity(model) != ident


def test_tokenizer_counts(model):
    ident = teacher_identity(model)
    tj = model / "tokenizer.json"
    data = json.loads(tj.read_text())
    vocab = data["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    tj.write_text(json.dumps(data))
    assert teacher_identity(model) != ident
    (model / "tokenizer.json").unlink()
    shutil.copytree(model, model.parent / "other")
    _edit_json(model / "special_tokens_map.json" if (model / "special_tokens_map.json").exists()
               else model / "tokenizer_config.json", pad_token="<unk>")
    assert teacher_identity(model) != teacher_identity(model.parent / "other")


def test_input_appearing_or_disappearing_is_seen(model):
    ident = teacher_identity(model)
    (model / "added_tokens.json").write_text(json.dumps({"<|tool|>": 183}))
    assert teacher_identity(model) != ident
    (model / "added_tokens.json").unlink()
    assert teacher_identity(model) == ident


def test_a_memo_that_does_not_validate_is_ignored(model):
    ident = teacher_identity(model)
    memo = model / MEMO_NAME
    data = json.loads(memo.read_text())
    for entry in data["files"].values():
        entry["digest"] = "0" * 64
        entry["stat"] = [entry["stat"][0], 1, 1]  # stats that do not match the files
    memo.write_text(json.dumps(data))
    assert fresh(model) == ident
    memo.write_text("{not json")
    assert fresh(model) == ident
    memo.write_text(json.dumps({"version": 999, "files": data["files"]}))
    assert fresh(model) == ident


def test_sharded_weights_by_content_not_shard_names(model, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}

    def shard(folder: Path, rename: dict[str, str]) -> str:
        shutil.copytree(model, folder, ignore=shutil.ignore_patterns(MEMO_NAME, "*.safetensors"))
        weight_map = {}
        for fname, keys in parts.items():
            save_file({k: tensors[k] for k in keys}, folder / rename.get(fname, fname),
                      metadata={"format": "pt"})
            weight_map.update({k: rename.get(fname, fname) for k in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return teacher_identity(folder)

    a = shard(tmp_path / "a", {})
    b = shard(tmp_path / "b", {"model-00001-of-00002.safetensors": "zz-second.safetensors",
                               "model-00002-of-00002.safetensors": "aa-first.safetensors"})
    assert a == b
    (tmp_path / "a" / "stray.safetensors").write_bytes(b"junk")  # not in the index: not loaded
    assert teacher_identity(tmp_path / "a") == a
    _flip_one_weight(tmp_path / "b" / "zz-second.safetensors")
    assert teacher_identity(tmp_path / "b") != a


def _fake_hub_snapshot(model: Path, root: Path) -> tuple[Path, Path]:
    """models--owner--name/{blobs,snapshots/<rev>} as huggingface_hub lays it out: LFS files
    (weights) named by their sha256, git files by their git blob sha1."""
    repo = root / "models--owner--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    weight_blob = None
    for f in sorted(model.iterdir()):
        if not f.is_file() or f.name == MEMO_NAME:
            continue
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            name = hashlib.sha256(data).hexdigest()
            weight_blob = blobs / name
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (blobs / name).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / name)
    return snap, weight_blob


def test_hub_snapshot_identity_from_blob_names_without_reading_weights(model, tmp_path,
                                                                       monkeypatch):
    ident = teacher_identity(model)
    snap, weight_blob = _fake_hub_snapshot(model, tmp_path / "hub")
    real_open = builtins.open
    reads = []

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == weight_blob.resolve():
            raise AssertionError(f"weight bytes read: {file}")
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    assert content_identity(snap) == ident  # same content as the local directory
    assert teacher_identity(snap) == ident
    assert compute_identity(snap) == ident
    assert reads  # the guard was in the path: small files were read through it
    assert not (snap / MEMO_NAME).exists()  # nothing written into the hub cache
    monkeypatch.undo()
    # the identity follows the blob name: another LFS object is another identity
    other = weight_blob.with_name("f" * 64)
    weight_blob.rename(other)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / other.name)
    forget()
    assert teacher_identity(snap) != ident


def test_read_only_directory_keeps_the_memo_in_memory(model, monkeypatch):
    (model / MEMO_NAME).unlink()
    ident = teacher_identity(model)
    (model / MEMO_NAME).unlink()
    forget()
    monkeypatch.setattr(identity, "_write_memo", lambda memo, files: False)  # as if read-only
    time.sleep(0.06)
    calls = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: calls.append(p) or real(p))
    assert teacher_identity(model) == ident
    hashed = len(calls)
    assert hashed >= 1 and not (model / MEMO_NAME).exists()
    assert teacher_identity(model) == ident
    assert len(calls) == hashed  # second call: nothing read again


def _big_model(model: Path, folder: Path, mb: int = 100) -> Path:
    """The tiny model's config/tokenizer files with ~`mb` MB of random weights in two shards
    under valid safetensors headers."""
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns(MEMO_NAME, "*.safetensors"))
    rng = os.urandom
    weight_map = {}
    for i in range(2):
        n = mb * (1 << 20) // 2
        header = json.dumps({f"w{i}": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
        header += " " * (-len(header) % 8)
        name = f"model-0000{i + 1}-of-00002.safetensors"
        with open(folder / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header.encode())
            for _ in range(n // (1 << 20)):
                fh.write(rng(1 << 20))
        weight_map[f"w{i}"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_second_call_on_100mb_directory_is_fast(model, tmp_path, capsys):
    from distill_pipeline.models import _safetensors_problem

    big = _big_model(model, tmp_path / "big")
    assert all(_safetensors_problem(f) is None for f in big.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in big.iterdir())
    assert size > 100e6
    t0 = time.perf_counter()
    ident = teacher_identity(big)
    t1 = time.perf_counter()
    again = teacher_identity(big)
    t2 = time.perf_counter()
    forget()
    from_file = teacher_identity(big)  # as a new process would: memo file, stats
    t3 = time.perf_counter()
    assert ident == again == from_file
    first, second, new_process = t1 - t0, t2 - t1, t3 - t2
    with capsys.disabled():
        print(f"\nidentity of {size / 1e6:.0f} MB: first {first * 1e3:.1f} ms, second "
              f"{second * 1e3:.2f} ms, second from the memo file {new_process * 1e3:.2f} ms")
    assert second < 0.05 and new_process < 0.05
    assert first > second
