"""Model and tokenizer loading: Hugging Face hub ids, local checkpoints, and tiny offline presets.

`load_model(spec)` / `load_tokenizer(spec)` accept a `ModelSpec` (config tree). Tiny presets are
random-initialised Llama configs sharing the tokenizer shipped in `assets/tokenizer.json`.
`teacher_identity` is the content identity (`identity.py`: weights, forward-relevant config,
tokenizer, chat template): the teacher part of every teacher-logit cache key.

Where a model comes from (`name_or_path`): an existing local directory; else a hub id (`name` or
`owner/name`), read from the local Hugging Face cache when offline (`HF_HUB_OFFLINE=1`) and
downloaded otherwise. Anything else, and every incomplete or damaged folder, is a `ModelError`
that says what is wrong, where, and what to do, found from the files before any weights are read:
a model needs config.json plus *.safetensors or pytorch_model.bin (safetensors headers must match
the file sizes), a tokenizer needs tokenizer.json (or tokenizer.model / vocab files +
tokenizer_config.json) and a chat template. `load_checkpoint` / `load_tokenizer_dir` apply the
same checks to a stage's saved `model/` folder and name the stage to rerun with `--force`.

`check_model_spec(spec) -> str` is the cheap version for preflight: resolves the directory or hub
id and checks those files (JSON files parse, safetensors headers, chat template present) without
loading weights; returns a one-line description or raises `ModelError`. Online, a hub id costs
one metadata request (10 s timeout) to see that the model exists and holds weights + tokenizer; a
cached copy is accepted when the hub cannot be reached. Run it before `load_tokenizer` in
preflight: an unreachable hub makes transformers retry for about a minute.

Command line (`--help` prints usage; no flag prints usage and exits 2; nothing is written without
`--write-tokenizer`):

    python -m distill_pipeline.models --check             # exit 1 unless assets/tokenizer.json
                                                         # equals a fresh deterministic build
    python -m distill_pipeline.models --write-tokenizer   # rebuild and rewrite that asset
    python -m distill_pipeline.models --check-model NAME_OR_PATH   # check_model_spec on it
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tokenizer.json"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Presets: the teacher is several times the student (parameter ratio printed by `describe`).
PRESETS: dict[str, dict[str, int]] = {
    "tiny-teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4),
    "tiny-student": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
}


class ModelError(ValueError):
    """A model or tokenizer cannot be loaded or used as asked."""


def build_tiny_tokenizer_json() -> str:
    """Train the tiny BPE tokenizer on the toy corpus; deterministic (same JSON every time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from distill_pipeline.data.toy import corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str(pretty=False)


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(TINY_TOKENIZER)),
                                  pad_token="<|pad|>", eos_token="<|end|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _quiet_transformers() -> None:
    """Per-file 'Loading weights' bars drown the stage progress bars; the stage reports instead."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Where a model comes from, and whether its files are usable (checked before any weights load).

_TOKENIZER_HINT = ("expected tokenizer.json, or tokenizer.model / vocab files + "
                   "tokenizer_config.json")
_WEIGHTS_HINT = "expected config.json and *.safetensors or pytorch_model.bin"
_NO_TEMPLATE = "no chat template"
_HUB_PART = re.compile(r"\w(?:[\w.-]*\w)?", re.ASCII)


def _is_hub_id(name: str) -> bool:
    """`name` or `owner/name` by the hub's rules (huggingface_hub's validate_repo_id)."""
    parts = name.split("/")
    return (0 < len(name) <= 96 and len(parts) <= 2 and "--" not in name and ".." not in name
            and not name.endswith(".git") and all(_HUB_PART.fullmatch(p) for p in parts))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (not only at huggingface_hub import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(hub_id: str) -> Path | None:
    """The hub id's snapshot folder in the local Hugging Face cache, without any network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub at all
        return None


def _download_hint(hub_id: str, verb: str = "run") -> str:
    return f"{verb} `huggingface-cli download {hub_id}` (or `hf download {hub_id}`) with network"


@dataclass(frozen=True)
class _Source:
    """A resolved `name_or_path`: `local` is the folder to read (a local directory or, offline,
    the cached hub snapshot); `hub_id` is set when it came from the hub."""
    label: str
    local: Path | None
    hub_id: str | None = None

    @property
    def load_from(self) -> str:
        return str(self.local) if self.local is not None else str(self.hub_id)

    def todo(self) -> str:
        if self.hub_id:
            return (f"The local Hugging Face cache of {self.hub_id!r} is incomplete or damaged: "
                    f"{_download_hint(self.hub_id)} to complete it (add --force-download to "
                    "replace damaged files).")
        return ("Point name_or_path at a complete model directory (model.save_pretrained(dir) "
                "and tokenizer.save_pretrained(dir) write one), or re-copy the damaged files.")


def _resolve(name_or_path: str, prefix: str) -> _Source:
    """Local directory, cached hub snapshot (offline), or hub id to download; else ModelError."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _Source(name_or_path, path)
    if path.exists():
        raise ModelError(f"{prefix}: {path} is a file, not a model directory. Point name_or_path "
                         "at the directory holding config.json, the weights and the tokenizer "
                         "files, or at a hub id (owner/name).")
    if name_or_path.startswith((".", "/", "~")) or not _is_hub_id(name_or_path):
        raise ModelError(f"{prefix}: no such local directory {path.absolute()}, and not a hub id "
                         "(owner/name). Fix name_or_path: a directory holding a saved model, or "
                         "a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'.")
    if _hub_offline():
        snapshot = _cached_snapshot(name_or_path)
        if snapshot is None:
            raise ModelError(
                f"{prefix}: no such local directory {path.absolute()}, and hub model "
                f"{name_or_path!r} is not downloaded (offline: HF_HUB_OFFLINE is set, nothing "
                f"is fetched). {_download_hint(name_or_path, 'Run')}, or point "
                "name_or_path at a local directory.")
        return _Source(name_or_path, snapshot, name_or_path)
    return _Source(name_or_path, None, name_or_path)  # transformers downloads (or updates) it


def _read_json(f: Path) -> tuple[Any, str | None]:
    """(parsed object, None) or (None, what is wrong with the file)."""
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"{f} is not valid JSON (not UTF-8 text at byte {exc.start}; damaged?)"
    except json.JSONDecodeError as exc:
        return None, (f"{f} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; "
                      "damaged or truncated)")
    except OSError as exc:
        return None, f"cannot read {f} ({exc.strerror})"
    if not isinstance(data, dict):
        return None, f"{f} is not a JSON object (got {type(data).__name__})"
    return data, None


def _safetensors_problem(f: Path) -> str | None:
    """Header parses and the tensors it describes end exactly at the end of the file."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            if n is None or 8 + n > size:
                return f"{f} is truncated ({size} bytes, shorter than its own header; damaged)"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"{f} is damaged (unreadable safetensors header: {exc})"
    if 8 + n + end != size:
        how = "is truncated" if size < 8 + n + end else "has trailing bytes"
        return f"{f} {how} ({size} bytes, its header describes {8 + n + end}; damaged)"
    return None


def _weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name.endswith((".safetensors.index.json", ".bin.index.json"))
        or (p.name.startswith("pytorch_model") and p.suffix == ".bin")))


# config.json fields that size a model (transformers' names and the GPT-2 / OPT / T5-style ones
# some architectures use), top level or in a multimodal model's `text_config`.
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim", "n_embd", "n_layer", "n_head",
                "n_inner", "d_model", "num_layers", "num_heads", "ffn_dim")


def config_problems(config: dict, where: str) -> list[str]:
    """The sizes in a model's config (a parsed config.json) that cannot describe a model: each
    size field that is given (not null) must be a positive integer. transformers accepts zero
    layers (an empty model) and negative sizes (a crash deep in torch) without a word."""
    problems = []
    for prefix, section in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(section, dict):
            continue
        for name in _SIZE_FIELDS:
            value = section.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{where}: {prefix}{name} is {value!r}, not a positive integer "
                                "(a damaged or hand-edited config.json?)")
    return problems


def _model_problems(d: Path) -> list[str]:
    if is_adapter(d):
        return _adapter_problems(d)
    config, weights = d / "config.json", _weight_files(d)
    missing = [what for what, gone in (("config.json", not config.is_file()),
                                       ("weights", not weights)) if gone]
    if missing:
        return [f"no model weights/config in {d} ({_WEIGHTS_HINT}; {' and '.join(missing)} "
                "missing)"]
    parsed, why = _read_json(config)
    problems = [why] if why else config_problems(parsed, str(config))
    for f in weights:
        if f.name.endswith(".index.json"):
            index, why = _read_json(f)
            if why:
                problems.append(why)
                continue
            shards = sorted(set((index.get("weight_map") or {}).values()))
            gone = [s for s in shards if not (d / s).is_file()]
            if gone:
                problems.append(f"{f} lists {len(gone)} shard file(s) missing from {d}: "
                                f"{', '.join(gone[:3])}{' …' if len(gone) > 3 else ''}")
        elif f.suffix == ".safetensors":
            problems.extend(why for why in [_safetensors_problem(f)] if why)
    return problems


def _has_chat_template(d: Path, tokenizer_config: dict | None) -> bool:
    """Where transformers looks: chat_template.jinja, additional_chat_templates/, or the
    "chat_template" entry of tokenizer_config.json."""
    if (d / "chat_template.jinja").is_file():
        return True
    extra = d / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    return bool(tokenizer_config and tokenizer_config.get("chat_template"))


def _tokenizer_problems(d: Path, *, template: bool, deep: bool) -> list[str]:
    if is_adapter(d) and not _has_tokenizer_files(d):
        try:
            d = base_dir(d)
        except ModelError as exc:
            return [str(exc)]
    names = {p.name for p in d.iterdir() if p.is_file()}
    if "tokenizer.json" not in names:
        vocab = sorted(n for n in names if n.endswith((".model", ".tiktoken"))
                       or n.startswith("vocab.") or n == "merges.txt")
        if not vocab or "tokenizer_config.json" not in names:
            found = f"; found {', '.join(vocab)} but no tokenizer_config.json" if vocab else ""
            return [f"no tokenizer files in {d} ({_TOKENIZER_HINT}{found})"]
    problems, tokenizer_config = [], None
    if "config.json" in names:  # AutoTokenizer reads it too
        problems.extend(why for why in [_read_json(d / "config.json")[1]] if why)
    if "tokenizer_config.json" in names:
        tokenizer_config, why = _read_json(d / "tokenizer_config.json")
        problems.extend([why] if why else [])
    if deep and "tokenizer.json" in names:
        problems.extend(why for why in [_read_json(d / "tokenizer.json")[1]] if why)
    if template and not problems and not _has_chat_template(d, tokenizer_config):
        problems.append(f"{_NO_TEMPLATE} in {d} (expected chat_template.jinja, or a "
                        "\"chat_template\" entry in tokenizer_config.json)")
    return problems


def _dir_problems(d: Path, *, model: bool, tokenizer: bool, template: bool = True,
                  deep: bool = False) -> list[str]:
    if not d.exists():
        return [f"{d} does not exist"]
    if not d.is_dir():
        return [f"{d} is a file, not a model directory"]
    problems = ((_model_problems(d) if model else [])
                + (_tokenizer_problems(d, template=template, deep=deep) if tokenizer else []))
    return list(dict.fromkeys(problems))  # config.json is checked for both


_TEMPLATE_TODO = ("The pipeline formats every prompt with the chat template: use a chat/instruct "
                  "model, add a template as chat_template.jinja in that directory, or give one "
                  "for every model of the run as data.chat_template (Jinja text or a file).")


def _error(prefix: str, problems: list[str], todo: str) -> ModelError:
    """One message: what is wrong and where (each problem), then what to do."""
    if all(p.startswith(_NO_TEMPLATE) for p in problems):
        todo = _TEMPLATE_TODO
    return ModelError(f"{prefix}: {'; '.join(problems)}. {todo}")


def _load_failed(src: _Source, prefix: str, exc: Exception, *, model: bool) -> ModelError:
    """transformers failed after the cheap checks passed: look deeper for the damaged file."""
    if src.local is not None:
        problems = _dir_problems(src.local, model=model, tokenizer=not model, deep=True)
        if problems:
            return _error(prefix, problems, src.todo())
    what = f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"
    if src.local is None:  # online hub id
        return ModelError(
            f"{prefix}: {what}. Check the id at https://huggingface.co/{src.hub_id} and the network "
            f"(gated or private models need `hf auth login`), or {_download_hint(src.hub_id)} "
            "first, or point name_or_path at a local directory.")
    return ModelError(f"{prefix}: {what} (reading {src.local}). {src.todo()}")


def _stage_error(path: Path, problems: list[str]) -> ModelError:
    """A stage's saved model folder is unusable: name it and the stage to rerun."""
    m = re.fullmatch(r"(.+)-[0-9a-f]{12}", path.parent.name)
    node = m.group(1) if m else "<stage>"
    return ModelError(f"stage output {path} is missing or damaged: {'; '.join(problems)}. "
                      f"Rerun the stage that wrote it with --force (`distill-pipeline run {node} "
                      "--force`, same -c/--set) to rebuild it.")


def _check_stage_dir(path: Path, *, model: bool, tokenizer: bool) -> None:
    problems = _dir_problems(path, model=model, tokenizer=tokenizer)
    if problems:
        raise _stage_error(path, problems)


# ---------------------------------------------------------------------------------------------


def load_tokenizer(spec: Any, chat_template: str | None = None):
    """Tokenizer for a ModelSpec (preset, local directory or hub id), with pad and chat template
    (`chat_template`, the text of `data.chat_template`, replaces the model's own)."""
    if spec.preset:
        tok = _tiny_tokenizer()
        if chat_template is not None:
            tok.chat_template = chat_template
        return tok
    from transformers import AutoTokenizer

    prefix = f"cannot load tokenizer from {spec.name_or_path!r}"
    src = _resolve(spec.name_or_path, prefix)
    if src.local is not None:
        problems = _tokenizer_problems(src.local, template=False, deep=False)
        if problems:
            raise _error(prefix, problems, src.todo())
    try:
        tok = AutoTokenizer.from_pretrained(
            str(tokenizer_dir(src.local)) if src.local is not None else src.load_from)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one message
        raise _load_failed(src, prefix, exc, model=False) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        where = f" in {src.local}" if src.local is not None else ""
        raise ModelError(f"{prefix}: {_NO_TEMPLATE}{where} (its tokenizer_config.json has no "
                         "\"chat_template\" entry and there is no chat_template.jinja). "
                         + _TEMPLATE_TODO.replace("in that directory", "next to it"))
    return tok


def load_model(spec: Any, *, seed: int = 0):
    """A causal LM for a ModelSpec: random-initialised preset, or from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    if spec.dtype == "auto":
        dtype = torch.float32 if spec.preset else "auto"
    else:
        dtype = getattr(torch, spec.dtype)
    if spec.preset:
        tok = _tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256,
                             bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                             **PRESETS[spec.preset])
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype).to(device())
    prefix = f"cannot load model from {spec.name_or_path!r}"
    src = _resolve(spec.name_or_path, prefix)
    if src.local is not None:
        problems = _model_problems(src.local)
        if problems:
            raise _error(prefix, problems, src.todo())
    try:
        model = (_load_weights(src.local, dtype) if src.local is not None and is_adapter(src.local)
                 else AutoModelForCausalLM.from_pretrained(src.load_from, dtype=dtype))
    except ModelError:
        raise
    except Exception as exc:
        raise _load_failed(src, prefix, exc, model=True) from exc
    return model.to(device())


def device():
    """The accelerator when one is visible (CUDA), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(path: Path, *, dtype: str = "auto"):
    """Model (in the dtype it was saved in, on `device()`) + tokenizer saved by a stage.
    A missing or damaged folder is a ModelError naming it and the stage to rerun with --force."""
    import torch
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    _check_stage_dir(path, model=True, tokenizer=True)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = _load_weights(path, torch_dtype)
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(path)))
    except ModelError:
        raise
    except Exception as exc:
        problems = _dir_problems(path, model=True, tokenizer=True, deep=True)
        raise _stage_error(path, problems or [f"{type(exc).__name__}: {exc}"]) from exc
    return model.to(device()), tok


def load_tokenizer_dir(path: Path):
    """Tokenizer saved by a stage next to its model (checked like `load_checkpoint`)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    _check_stage_dir(path, model=False, tokenizer=True)
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir(path)))
    except Exception as exc:
        problems = _dir_problems(path, model=False, tokenizer=True, deep=True)
        raise _stage_error(path, problems or [f"{type(exc).__name__}: {exc}"]) from exc


# ---------------------------------------------------------------------------------------------
# LoRA adapters (peft): a directory with adapter_config.json and adapter_model.safetensors, whose
# `base_model_name_or_path` names the base — a hub id, an absolute path, or a path relative to the
# adapter directory (how the pipeline publishes an adapter over a base saved beside it). Loaded as
# the base with the adapter merged in; `load_adapter_pair` keeps it unmerged (adapter on/off).

ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(d: Path) -> bool:
    return (Path(d) / ADAPTER_CONFIG).is_file()


def _has_tokenizer_files(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def _adapter_problems(d: Path) -> list[str]:
    config, why = _read_json(d / ADAPTER_CONFIG)
    if why:
        return [why]
    problems = []
    if not isinstance(config.get("base_model_name_or_path"), str) or not config["base_model_name_or_path"]:
        problems.append(f"{d / ADAPTER_CONFIG} names no base model (base_model_name_or_path): set it "
                        "to the base's directory or hub id")
    weights = [d / w for w in _ADAPTER_WEIGHTS if (d / w).is_file()]
    if not weights:
        problems.append(f"no adapter weights in {d} (expected adapter_model.safetensors)")
    problems.extend(why for f in weights if f.suffix == ".safetensors"
                    for why in [_safetensors_problem(f)] if why)
    return problems


def adapter_base(d: Path) -> str:
    """What an adapter names as its base: a path relative to the adapter directory resolved
    against it, else the name as written (an absolute path or a hub id)."""
    d = Path(d)
    problems = _adapter_problems(d)
    if problems:
        raise ModelError(f"LoRA adapter {d}: {'; '.join(problems)}")
    base = json.loads((d / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    rel = Path(base).expanduser()
    if not rel.is_absolute() and (d / rel).is_dir():
        return str((d / rel).resolve())
    return base


def base_dir(d: Path) -> Path:
    """The local directory of an adapter's base (a hub id: its snapshot in the local cache)."""
    base = adapter_base(d)
    return import_path(base, f"the base model {base!r} of the LoRA adapter {d}")


def tokenizer_dir(d: Path) -> Path:
    """Where a model directory's tokenizer is: its own, or (an adapter without one) its base's."""
    d = Path(d)
    return tokenizer_dir(base_dir(d)) if is_adapter(d) and not _has_tokenizer_files(d) else d


def config_dir(d: Path) -> Path:
    """The directory whose config.json describes the model (an adapter's: its base's, down the chain)."""
    return config_dir(base_dir(d)) if is_adapter(d) else d


def _load_weights(d: Path, dtype: Any):
    """from_pretrained of a model directory; an adapter's base with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    if not is_adapter(d):
        return AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
    from peft import PeftModel

    base = _load_weights(base_dir(d), dtype)
    return PeftModel.from_pretrained(base, str(d)).merge_and_unload()


def load_adapter_pair(adapter: Path, *, dtype: str = "auto"):
    """(peft model, tokenizer) of an adapter directory, unmerged: the base with the adapter on,
    and — inside `model.disable_adapter()` — the base alone. One copy of the base serves both."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    _quiet_transformers()
    adapter = Path(adapter)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = _load_weights(base_dir(adapter), torch_dtype)
    model = PeftModel.from_pretrained(base, str(adapter))
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(adapter)))
    return model.to(device()), tok


@dataclass(frozen=True)
class AdapterSide:
    """A teacher that is one side of a LoRA adapter loaded once (`load_adapter_pair`): the adapted
    model (`on`), or its base (the adapter disabled). What `teacher_logits` extracts the DPO
    teacher and its reference from when the one is an adapter over the other."""
    adapter: str
    on: bool
    dtype: str = "auto"


def adapter_over(model: "ModelRef", base: "ModelRef") -> bool:
    """Whether `model` is a LoRA adapter whose base is `base` (same content identity, loaded in the
    same dtype with the same chat template): then one copy of the base serves both."""
    if (not is_adapter(Path(model.path)) or model.dtype != base.dtype
            or model.chat_template != base.chat_template):
        return False
    try:
        return teacher_identity(base_dir(Path(model.path))) == teacher_identity(Path(base.path))
    except (ModelError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# A node's model: what a stage reads from an upstream node's folder. A trained node publishes
# `model/`; an import node publishes `imported.json`, naming a checkpoint outside the run dir.

IMPORTED = "imported.json"


@dataclass(frozen=True)
class ModelRef:
    """A model to load: its directory, the dtype to load it in ("auto": the dtype in its
    config.json), a chat template that replaces its own, and — for imports — the identity it had
    when imported (checked again on every load)."""
    path: str
    dtype: str = "auto"
    chat_template: str | None = None
    identity: str | None = None
    label: str = ""


def model_ref(folder: Path) -> ModelRef:
    """The model an upstream node's output folder provides."""
    folder = Path(folder)
    record = folder / IMPORTED
    if not record.is_file():
        return ModelRef(str(folder / "model"), label=str(folder / "model"))
    info = json.loads(record.read_text())
    path = Path(info["path"])  # absolute, as resolved when imported; else resolve again (another
    if not path.is_dir():      # machine of the cluster: its own Hugging Face cache)
        path = import_path(info["name_or_path"], f"imported model {info['name_or_path']!r}")
    return ModelRef(str(path), info["dtype"], info.get("chat_template"), info["identity"],
                    label=info["name_or_path"])


def import_path(name_or_path: str, prefix: str) -> Path:
    """The local directory of an import: the directory itself, or the hub id's snapshot in the
    local Hugging Face cache (never downloaded here: the identity must be computable offline)."""
    src = _resolve(name_or_path, prefix)
    local = src.local if src.local is not None else _cached_snapshot(name_or_path)
    if local is None:
        raise ModelError(
            f"{prefix}: hub model {name_or_path!r} is not in the local Hugging Face cache. An "
            "import is identified by its files (its identity is the teacher part of every cache "
            f"key), so it must be downloaded first: {_download_hint(name_or_path, 'run')} — or "
            "`distill-pipeline run`, which downloads imports when the hub is reachable — or point "
            "name_or_path at a local directory.")
    problems = _dir_problems(local, model=True, tokenizer=True, template=False, deep=False)
    if problems:
        raise _error(prefix, problems, src.todo())
    return local


def fetch_imports(specs: dict[str, Any], echo=print) -> None:
    """Download the imports that are hub ids missing from the local cache (`run` only; `status`
    never downloads). Weights as safetensors, plus config, tokenizer and chat template files;
    `original/` duplicates skipped."""
    for name, spec in specs.items():
        if spec is None:
            continue
        hub_id = spec.name_or_path
        if (Path(hub_id).expanduser().exists() or not _is_hub_id(hub_id) or _hub_offline()
                or _cached_snapshot(hub_id) is not None):
            continue
        from huggingface_hub import snapshot_download

        echo(f"{name}: downloading {hub_id} from the Hugging Face hub")
        try:
            snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                      "*.jinja", "*.tiktoken"],
                              ignore_patterns=["original/*"])
        except Exception as exc:
            raise ModelError(f"{name}: cannot download {hub_id!r} ({type(exc).__name__}: "
                             f"{exc}). {_download_hint(hub_id)}, or point name_or_path at a local "
                             "directory.") from exc


def import_identity(path: Path, dtype: str, chat_template: str | None) -> str:
    """An import's identity: its content identity (`identity.py`) when it is loaded as saved;
    loaded in another dtype than its config's, or with `data.chat_template` replacing its own,
    a hash of the content identity and those choices (other log-probs, another identity)."""
    content = teacher_identity(Path(path))
    config = _read_json(config_dir(Path(path)) / "config.json")[0] or {}
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype in ("auto", saved) and chat_template is None:
        return content
    payload = json.dumps({"content": content, "dtype": dtype, "chat_template": chat_template},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def ref_identity(ref: ModelRef) -> str:
    """The teacher part of a cache key for a node's model. An import must still have the identity
    it was imported with: changed files (or another dtype/template) are refused, not used."""
    now = import_identity(Path(ref.path), ref.dtype, ref.chat_template)
    if ref.identity is not None and now != ref.identity:
        raise ModelError(f"imported model {ref.label!r} ({ref.path}) changed after it was imported "
                         f"(identity {ref.identity[:12]} → {now[:12]}); run the pipeline again: the "
                         "import and everything computed from it will be redone")
    return now


def load_ref(ref: ModelRef):
    """(model, tokenizer) of a node's model, on `device()`; imports are identity-checked first."""
    if ref.identity is None:
        model, tok = load_checkpoint(Path(ref.path), dtype=ref.dtype)
    else:
        ref_identity(ref)
        model = load_model(_spec(ref))
        tok = load_tokenizer(_spec(ref), ref.chat_template)
    return model, tok


def load_ref_tokenizer(ref: ModelRef):
    if ref.identity is None:
        return load_tokenizer_dir(Path(ref.path))
    return load_tokenizer(_spec(ref), ref.chat_template)


def _spec(ref: ModelRef) -> Any:
    from distill_pipeline.config import ModelSpec

    return ModelSpec(name_or_path=ref.path, dtype=ref.dtype)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _describe_dir(d: Path) -> str:
    config = _read_json(d / "config.json")[0] or {}
    arch = ", ".join(config.get("architectures") or []) or config.get("model_type", "?")
    weights = [f for f in _weight_files(d) if not f.name.endswith(".index.json")]
    return (f"{arch}, {len(weights)} weight file(s), {_size(sum(f.stat().st_size for f in weights))}")


def _check_hub_online(hub_id: str, prefix: str) -> str:
    """One metadata request: the repo exists (and is readable) and holds a model + tokenizer."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(hub_id, timeout=10)
    except GatedRepoError as exc:
        raise ModelError(f"{prefix}: hub model {hub_id!r} is gated: accept its terms at "
                         f"https://huggingface.co/{hub_id} and log in (`hf auth login` or "
                         "HF_TOKEN).") from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(f"{prefix}: no such local directory {Path(hub_id).absolute()}, and no "
                         f"model {hub_id!r} on the Hugging Face hub (or it is private: log in "
                         "with `hf auth login`). Fix name_or_path.") from exc
    except Exception as exc:  # network: fine if it is cached (transformers falls back to it)
        snapshot = _cached_snapshot(hub_id)
        if snapshot is not None:
            return f"hub model {hub_id} (cached at {snapshot}; hub not reachable: {type(exc).__name__})"
        raise ModelError(
            f"{prefix}: hub model {hub_id!r} is not downloaded and the hub cannot be reached "
            f"({type(exc).__name__}: {exc}). Check the network, or {_download_hint(hub_id)} "
            "and set HF_HUB_OFFLINE=1, or point name_or_path at a local directory.") from exc
    files = {s.rfilename for s in info.siblings or []}
    missing = []
    if "config.json" not in files or not any(
            f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
            for f in files):
        missing.append(f"no model weights/config ({_WEIGHTS_HINT})")
    if "tokenizer.json" not in files and "tokenizer_config.json" not in files:
        missing.append(f"no tokenizer files ({_TOKENIZER_HINT})")
    if missing:
        raise ModelError(f"{prefix}: hub repo {hub_id!r} has {' and '.join(missing)}; it is not a "
                         "transformers causal-LM checkpoint this pipeline can load. Pick another "
                         "model.")
    return f"hub model {hub_id} ({info.pipeline_tag or 'no pipeline tag'}; downloaded on first use)"


def check_model_spec(spec: Any, *, template_given: bool = False) -> str:
    """Cheap preflight for a ModelSpec: resolve the local directory or hub id and check its files
    (config.json + weights with sound safetensors headers, tokenizer files, a chat template; JSON
    files parse) without loading weights. Returns a one-line description; raises ModelError (what,
    where, what to do). A hub id neither cached nor offline costs one hub metadata request."""
    if spec.preset:
        if not TINY_TOKENIZER.is_file():
            raise ModelError(f"preset {spec.preset!r}: the shipped tokenizer {TINY_TOKENIZER} is "
                             "missing; reinstall distill_pipeline or rebuild it with "
                             "`python -m distill_pipeline.models --write-tokenizer`.")
        p = PRESETS[spec.preset]
        return (f"preset {spec.preset} (random-initialised Llama, {p['num_hidden_layers']} layers "
                f"x {p['hidden_size']} hidden; shipped tokenizer)")
    label = spec.name_or_path
    prefix = f"model {label!r}"
    src = _resolve(label, prefix)
    if src.local is None:
        return _check_hub_online(label, prefix)
    problems = _dir_problems(src.local, model=True, tokenizer=True, template=not template_given,
                             deep=True)
    if problems:
        raise _error(prefix, problems, src.todo())
    where = (f"hub model {src.hub_id} (cached at {src.local})" if src.hub_id
             else f"local directory {src.local}")
    return f"{where}: {_describe_dir(src.local)}"


def tokenizer_fingerprint(tok) -> str:
    """Hash of the vocabulary, special tokens and chat template: equal iff ids mean the same."""
    payload = json.dumps({"vocab": sorted(tok.get_vocab().items()),
                          "special": sorted(map(str, tok.all_special_tokens)),
                          "eos": tok.eos_token, "pad": tok.pad_token,
                          "template": tok.chat_template}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_same_tokenizer(first_tok, second_tok, *, first: str, second: str) -> None:
    """Refuse two models of one run whose token ids mean different things."""
    if tokenizer_fingerprint(first_tok) == tokenizer_fingerprint(second_tok):
        return
    tv, sv = first_tok.get_vocab(), second_tok.get_vocab()
    differing = sorted(k for k in set(tv) | set(sv) if tv.get(k) != sv.get(k))[:5]
    why = (f"vocabularies differ ({len(tv)} vs {len(sv)} entries; e.g. {differing})" if differing
           else "special tokens or chat templates differ")
    raise ModelError(
        f"{first} and {second} use different tokenizers: {why}. "
        "Cached teacher token ids must mean the same thing to the student; pick models that "
        "share a tokenizer (e.g. one model family).")


def describe(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} {n / 1e6:.2f}M params"


def teacher_identity(model_dir: Path) -> str:
    """Teacher part of a cache key: the checkpoint's content identity (`identity.py`), memoised
    in the directory against (size, mtime_ns, ctime_ns) of every input, re-validated every call.
    A LoRA adapter directory: a hash of the adapter's content identity (config and weights) and
    its base's identity (wherever the base lives)."""
    from distill_pipeline.identity import content_identity

    own = content_identity(Path(model_dir))
    if not is_adapter(Path(model_dir)):
        return own
    payload = json.dumps({"adapter": own, "base": teacher_identity(base_dir(Path(model_dir)))}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_model(model, tok, folder: Path, state_dict: dict | None = None, dtype: Any = None) -> None:
    """save_pretrained for weights (`state_dict`: these instead of the model's own, e.g. gathered
    from FSDP shards; `dtype`: the dtype they are in, when it is not the model's — config.json
    says it, so a load with dtype "auto" gets it) and tokenizer, then the identity memo."""
    model.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
    if dtype is not None:
        config = json.loads((Path(folder) / "config.json").read_text())
        for field in ("dtype", "torch_dtype"):
            if field in config:
                config[field] = str(dtype).replace("torch.", "")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(folder)
    teacher_identity(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m distill_pipeline.models`: check or rewrite the shipped tokenizer, check a model."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m distill_pipeline.models",
        description=f"The tokenizer shipped for the tiny presets ({TINY_TOKENIZER}) and a model "
                    "check. Nothing is written without --write-tokenizer.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true",
                        help="verify the shipped tokenizer equals a fresh deterministic build "
                             "(exit 1 if not)")
    action.add_argument("--write-tokenizer", action="store_true",
                        help="rebuild the tokenizer and rewrite the shipped asset (changes token "
                             "ids of the tiny presets if the build differs)")
    action.add_argument("--check-model", metavar="NAME_OR_PATH",
                        help="check a local model directory or hub id as the pipeline's "
                             "preflight does, without loading weights (exit 1 with the reason)")
    args = parser.parse_args(argv)
    if args.write_tokenizer:
        text = build_tiny_tokenizer_json()
        tmp = TINY_TOKENIZER.with_name(TINY_TOKENIZER.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, TINY_TOKENIZER)
        print(f"wrote {TINY_TOKENIZER}")
        return 0
    if args.check:
        fresh = build_tiny_tokenizer_json()
        try:
            shipped = TINY_TOKENIZER.read_text(encoding="utf-8")
        except OSError:
            shipped = None
        if shipped == fresh:
            print(f"ok: {TINY_TOKENIZER} equals a fresh build")
            return 0
        why = ("is missing" if shipped is None else "differs from a fresh build (a different "
               "`tokenizers` version can change it)")
        print(f"error: {TINY_TOKENIZER} {why}. Rewrite it with `python -m distill_pipeline.models "
              "--write-tokenizer` if the new build is intended (the tiny presets' token ids, "
              "and so their cached teacher logits, follow it).", file=sys.stderr)
        return 1
    from types import SimpleNamespace

    try:
        print(check_model_spec(SimpleNamespace(preset=None, name_or_path=args.check_model)))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
