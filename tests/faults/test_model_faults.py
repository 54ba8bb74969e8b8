"""Model fault corpus: broken model folders, bad `name_or_path`s, damaged stage outputs and the
`python -m distill_pipeline.models` CLI. Each case asserts a `ModelError` (or exit code) and the
words the message must contain: what is wrong, where, and what to do. Nothing touches the network
(HF_HUB_OFFLINE=1, an empty private hub cache)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill_pipeline import models
from distill_pipeline.models import (ModelError, build_tiny_tokenizer_json, check_model_spec,
                                     load_checkpoint, load_model, load_tokenizer,
                                     load_tokenizer_dir, save_model)
from distill_pipeline.config import ModelSpec

ROOT = Path(__file__).resolve().parents[2]
HINT_TOK = "expected tokenizer.json, or tokenizer.model / vocab files + tokenizer_config.json"
HINT_WEIGHTS = "expected config.json and *.safetensors or pytorch_model.bin"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One tiny saved model (weights, config, tokenizer, chat template) per module; copy it."""
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    spec = ModelSpec(preset="tiny-student")
    save_model(load_model(spec), load_tokenizer(spec), folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: offline flags set now, and a private empty hub cache (nothing cached by accident)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def model_dir(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def spec(path) -> ModelSpec:
    return ModelSpec(name_or_path=str(path))


def raises(fn, *words, absent=()) -> str:
    with pytest.raises(ModelError) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"
    for w in absent:
        assert w not in msg, f"{w!r} should not be in message: {msg}"
    return msg


def truncate(f: Path, keep: float = 0.5) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * keep))


# --- local directories missing files ---------------------------------------------------------

def test_no_tokenizer_files_never_suggests_sentencepiece(model_dir):
    (model_dir / "tokenizer.json").unlink()
    for fn in (lambda: load_tokenizer(spec(model_dir)), lambda: check_model_spec(spec(model_dir))):
        raises(fn, f"no tokenizer files in {model_dir}", HINT_TOK, "Point name_or_path",
               absent=("sentencepiece", "tiktoken", "Traceback"))


def test_vocab_files_without_tokenizer_config_named(model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    (model_dir / "vocab.json").write_text("{}")
    (model_dir / "merges.txt").write_text("")
    raises(lambda: load_tokenizer(spec(model_dir)), f"no tokenizer files in {model_dir}",
           "found merges.txt, vocab.json but no tokenizer_config.json", absent=("sentencepiece",))


def test_no_config_json(model_dir):
    (model_dir / "config.json").unlink()
    for fn in (lambda: load_model(spec(model_dir)), lambda: check_model_spec(spec(model_dir))):
        raises(fn, f"no model weights/config in {model_dir}", HINT_WEIGHTS, "config.json missing",
               "Point name_or_path at a complete model directory")


def test_no_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    raises(lambda: load_model(spec(model_dir)), f"no model weights/config in {model_dir}",
           HINT_WEIGHTS, "weights missing", "cannot load model from")


def test_empty_directory_reports_model_and_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    raises(lambda: check_model_spec(spec(tmp_path / "empty")), "no model weights/config in",
           HINT_WEIGHTS, "no tokenizer files in", HINT_TOK)


# --- damaged files ---------------------------------------------------------------------------

def test_corrupt_config_json_named_for_model_and_tokenizer(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama",')
    cfg = str(model_dir / "config.json")
    for fn in (lambda: load_model(spec(model_dir)), lambda: load_tokenizer(spec(model_dir)),
               lambda: check_model_spec(spec(model_dir))):
        raises(fn, cfg, "is not valid JSON", "line 1", "re-copy the damaged files")


def test_config_json_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    raises(lambda: load_model(spec(model_dir)), str(model_dir / "config.json"),
           "is not a JSON object")


def test_truncated_safetensors_named_before_loading(model_dir):
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    truncate(weights)
    for fn in (lambda: load_model(spec(model_dir)), lambda: check_model_spec(spec(model_dir))):
        raises(fn, str(weights), "truncated", f"its header describes {size}",
               absent=("SafetensorError", "incomplete metadata"))


def test_safetensors_cut_inside_header(model_dir):
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(20)
    raises(lambda: load_model(spec(model_dir)), str(weights), "truncated")


def test_safetensors_with_trailing_garbage(model_dir):
    with open(model_dir / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 100)
    raises(lambda: load_model(spec(model_dir)), "model.safetensors has trailing bytes", "damaged")


def test_sharded_index_with_missing_shard(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    raises(lambda: load_model(spec(model_dir)), "model.safetensors.index.json lists 1 shard",
           f"missing from {model_dir}", "model-00002-of-00002.safetensors")


def test_corrupt_tokenizer_json_named(model_dir):
    truncate(model_dir / "tokenizer.json", 0.3)
    raises(lambda: load_tokenizer(spec(model_dir)), str(model_dir / "tokenizer.json"),
           "is not valid JSON", "damaged or truncated", absent=("JSONDecodeError",))


# --- chat template ---------------------------------------------------------------------------

def test_no_chat_template(model_dir):
    (model_dir / "chat_template.jinja").unlink()
    for fn in (lambda: load_tokenizer(spec(model_dir)), lambda: check_model_spec(spec(model_dir))):
        raises(fn, f"no chat template in {model_dir}", "chat_template.jinja",
               "use a chat/instruct model", '"chat_template" entry')


def test_chat_template_in_tokenizer_config_is_accepted(model_dir):
    template = (model_dir / "chat_template.jinja").read_text()
    (model_dir / "chat_template.jinja").unlink()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    assert "local directory" in check_model_spec(spec(model_dir))
    assert load_tokenizer(spec(model_dir)).chat_template == template


# --- name_or_path that is not a directory ----------------------------------------------------

@pytest.mark.parametrize("name", ["./nope", "a/b/c", "not a model!", "~/nope-xyz", "-bad/name"])
def test_neither_directory_nor_hub_id(name):
    for fn, what in ((lambda: load_tokenizer(spec(name)), "cannot load tokenizer"),
                     (lambda: load_model(spec(name)), "cannot load model"),
                     (lambda: check_model_spec(spec(name)), "model ")):
        raises(fn, what, repr(name), "no such local directory", "not a hub id (owner/name)",
               "Fix name_or_path", absent=("Repo id must", "Traceback"))


def test_missing_absolute_path(tmp_path):
    raises(lambda: load_tokenizer(spec(tmp_path / "nope")), "cannot load tokenizer",
           f"no such local directory {tmp_path / 'nope'}", "not a hub id")


def test_path_is_a_file(model_dir):
    f = model_dir / "config.json"
    for fn in (lambda: load_model(spec(f)), lambda: check_model_spec(spec(f))):
        raises(fn, f"{f} is a file, not a model directory", "Point name_or_path at the directory")


@pytest.mark.parametrize("hub_id", ["nobody-xyz/not-downloaded-model", "gpt-nonexistent"])
def test_hub_id_not_cached_while_offline(hub_id):
    for fn in (lambda: load_tokenizer(spec(hub_id)), lambda: load_model(spec(hub_id)),
               lambda: check_model_spec(spec(hub_id))):
        raises(fn, f"hub model {hub_id!r} is not downloaded", "HF_HUB_OFFLINE",
               f"huggingface-cli download {hub_id}", f"hf download {hub_id}",
               "point name_or_path at a local directory", absent=("couldn't connect",))


def fake_hub_cache(saved: Path, hub_id: str, keep=None) -> Path:
    """A snapshot laid out as huggingface_hub caches it (refs/main -> snapshots/<commit>)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(saved, snapshot, ignore=None if keep is None else
                    lambda d, names: [n for n in names if n not in keep])
    return snapshot


def test_cached_hub_id_loads_offline(saved):
    snapshot = fake_hub_cache(saved, "someone/tiny")
    assert check_model_spec(spec("someone/tiny")).startswith(
        f"hub model someone/tiny (cached at {snapshot})")
    assert load_tokenizer(spec("someone/tiny")).chat_template
    assert sum(p.numel() for p in load_model(spec("someone/tiny")).parameters()) > 0


def test_partly_downloaded_hub_id_says_download_again(saved):
    keep = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"}
    snapshot = fake_hub_cache(saved, "someone/partial", keep=keep)
    raises(lambda: load_model(spec("someone/partial")), f"no model weights/config in {snapshot}",
           "weights missing", "cache of 'someone/partial' is incomplete",
           "huggingface-cli download someone/partial")


# --- stage outputs (load_checkpoint / load_tokenizer_dir) ------------------------------------

@pytest.fixture
def stage_model(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "run" / "sft.teacher-0123456789ab" / "model"))


def test_stage_output_truncated_weights(stage_model):
    truncate(stage_model / "model.safetensors")
    raises(lambda: load_checkpoint(stage_model), f"stage output {stage_model}",
           str(stage_model / "model.safetensors"), "truncated",
           "distill-pipeline run sft.teacher --force")


def test_stage_output_missing_tokenizer(stage_model):
    (stage_model / "tokenizer.json").unlink()
    for fn in (lambda: load_checkpoint(stage_model), lambda: load_tokenizer_dir(stage_model)):
        raises(fn, f"stage output {stage_model}", "no tokenizer files", "--force",
               "sft.teacher", absent=("sentencepiece",))


def test_stage_output_corrupt_config(stage_model):
    (stage_model / "config.json").write_text("{")
    raises(lambda: load_checkpoint(str(stage_model)), str(stage_model / "config.json"),
           "is not valid JSON", "Rerun the stage that wrote it with --force")


def test_stage_output_folder_gone(tmp_path):
    gone = tmp_path / "run" / "train-abcdef012345" / "model"
    raises(lambda: load_checkpoint(gone), f"stage output {gone} is missing or damaged",
           "does not exist", "distill-pipeline run train --force")


def test_stage_output_intact_loads(stage_model):
    model, tok = load_checkpoint(stage_model)
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) > 0


# --- check_model_spec on good inputs ---------------------------------------------------------

def test_check_model_spec_describes_without_loading(model_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("check_model_spec loaded weights"))
    text = check_model_spec(spec(model_dir))
    assert f"local directory {model_dir}" in text and "LlamaForCausalLM" in text
    assert check_model_spec(ModelSpec(preset="tiny-teacher")).startswith("preset tiny-teacher")


# --- python -m distill_pipeline.models -------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "distill_pipeline.models", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_help_and_no_args_write_nothing():
    asset = models.TINY_TOKENIZER
    before, mtime = asset.read_bytes(), asset.stat().st_mtime_ns
    helped = run_cli("--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout and "--write-tokenizer" in helped.stdout
    assert "--check" in helped.stdout and "wrote" not in helped.stdout
    bare = run_cli()
    assert bare.returncode == 2 and "--write-tokenizer" in bare.stderr
    assert "Traceback" not in bare.stderr + helped.stderr
    assert asset.read_bytes() == before and asset.stat().st_mtime_ns == mtime


def test_cli_check_passes_on_shipped_asset():
    out = run_cli("--check")
    assert out.returncode == 0, out.stderr
    assert "ok:" in out.stdout and "tokenizer.json" in out.stdout


def test_cli_check_detects_a_different_or_missing_asset(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "tokenizer.json"
    fake.write_text(build_tiny_tokenizer_json().replace('"<unk>"', '"<UNK>"', 1))
    monkeypatch.setattr(models, "TINY_TOKENIZER", fake)
    assert models.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert str(fake) in err and "differs from a fresh build" in err and "--write-tokenizer" in err
    fake.unlink()
    assert models.main(["--check"]) == 1
    assert "is missing" in capsys.readouterr().err
    assert models.main(["--write-tokenizer"]) == 0  # explicit flag: writes (here, the fake path)
    assert fake.read_text(encoding="utf-8") == build_tiny_tokenizer_json()
    assert models.main(["--check"]) == 0


def test_cli_check_model_reports_without_traceback(model_dir):
    truncate(model_dir / "model.safetensors")
    out = run_cli("--check-model", str(model_dir))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error:" in out.stderr and "model.safetensors is truncated" in out.stderr
    bad = run_cli("--check-model", "a/b/c")
    assert bad.returncode == 1 and "not a hub id (owner/name)" in bad.stderr
