"""Model cards: the `README.md` of every published `model/` folder, in the Hugging Face model-card
format (YAML front matter, then Markdown), so a trained folder says what it is wherever it goes.

    ---
    base_model / datasets (hub ids only), tags, license: other (a placeholder), library_name
    ---
    # <node> — what trained it (stage, loss and options, hyper-parameters, summary)
    teachers and references by content identity; the cache format it read; its data;
    the evaluate table for this model (once an evaluate node has scored it); the command and the
    resolved config that reproduce it; package versions and timings.

Written by the runner when it publishes a node whose stage outputs `model/` (`sft.*`,
`teacher_dpo`, `train*`), into the partial folder before the rename, so a published model always
has its card; the evaluation section is rewritten in place when an `evaluate` node that scored the
model is published (`refresh_evaluated`). It sits on the pipeline floor, beside the runner, because
a card states what only the runner knows — the node's fingerprint, its inputs' folders, the
resolved config and the command line (`Plan.invocation`) — a stage does not know its own
fingerprint. Imported models get no card: their files are someone else's checkpoint, outside the
run dir. Content identity (`identity.py`) ignores README.md, so writing or refreshing a card
changes no identity, cache key or fingerprint.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from distill_pipeline.stages import get_stage

MODEL = "model"
CARD = "README.md"
EVAL_BEGIN, EVAL_END = "<!-- distill-pipeline:evaluation -->", "<!-- /distill-pipeline:evaluation -->"
LICENSE_NOTE = ("`license: other` is a placeholder: this folder's terms follow from its base model's "
                "license and its datasets' — set `license` (and `license_name` / `license_link`) "
                "before publishing it.")


def invocation(config: str, sets: list[str] | None) -> dict:
    """What the command line knows of a run, for the cards' reproduce section: the config path as
    given, its sha256 now (so a reader can tell whether the file changed since), the overrides and
    the working directory relative paths are read from."""
    from distill_pipeline.identity import sha256_file

    try:
        digest = sha256_file(Path(config))
    except OSError:
        digest = None
    return {"config": config, "config_sha256": digest, "sets": list(sets or []), "cwd": os.getcwd()}


def publishes_model(stage: str) -> bool:
    return MODEL in get_stage(stage).outputs


def write_card(plan: Any, name: str, folder: Path, manifest: dict) -> Path:
    """Write `<folder>/model/README.md` for node `name` (folder: its partial output, about to be
    published with `manifest`). Returns the card's path."""
    path = Path(folder) / MODEL / CARD
    _write(path, render(plan, name, Path(folder), manifest))
    return path


def refresh_evaluated(plan: Any, name: str) -> list[Path]:
    """After evaluate node `name` is published: rewrite the evaluation section of the card of
    every model it scored that has one (trained nodes of this run dir). Returns the cards
    rewritten."""
    if plan.node(name).stage != "evaluate":
        return []
    folder = plan.folder(name)
    results = json.loads((folder / "results.json").read_text())
    done = []
    for role, up in plan.node(name).needs.items():
        card = plan.folder(up) / MODEL / CARD
        if role not in results or not card.is_file():
            continue
        text = card.read_text(encoding="utf-8")
        if EVAL_BEGIN not in text or EVAL_END not in text:  # edited by hand: leave it alone
            continue
        head, rest = text.split(EVAL_BEGIN, 1)
        tail = rest.split(EVAL_END, 1)[1]
        section = _evaluation(plan, name, folder, role, results)
        _write(card, f"{head}{EVAL_BEGIN}\n{section}\n{EVAL_END}{tail}")
        done.append(card)
    return done


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- facts

def _ancestors(plan: Any, name: str) -> list[str]:
    """Every node `name` reads, directly or not, in plan (execution) order."""
    seen: set[str] = set()
    todo = list(plan.node(name).needs.values())
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(plan.node(up).needs.values())
    return [n.name for n in plan.nodes if n.name in seen]


def _identity(folder: Path) -> str:
    """The content identity a node's model is known by (the teacher part of cache keys)."""
    from distill_pipeline.models import model_ref, ref_identity

    ref = model_ref(folder)
    return ref.identity or ref_identity(ref)


def _root(plan: Any, name: str) -> tuple[str, Any]:
    """(the node the model's weights start from, its ModelSpec): following `init` (train) and
    `reference` (teacher_dpo) back to an `sft` or `import_model` node."""
    node = plan.node(name)
    while node.stage not in ("sft", "import_model"):
        up = node.needs.get("init") or node.needs.get("reference")
        if up is None:
            break
        node = plan.node(up)
    return node.name, getattr(node.view, "model", None)


def _hub_id(spec: Any) -> str | None:
    """The hub id a model spec names, or None (a preset, a local directory)."""
    if spec is None or not spec.name_or_path or Path(spec.name_or_path).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec.name_or_path)
    except HFValidationError:
        return None
    return spec.name_or_path


def _data_views(view: Any) -> list[Any]:
    from distill_pipeline.data import DataView

    return [v for v in (getattr(view, f) for f in type(view).model_fields) if isinstance(v, DataView)]


def _method(plan: Any, name: str) -> tuple[str, dict, str]:
    """(loss, options, where the options come from) of a trained node."""
    node = plan.node(name)
    if node.stage == "train":
        return node.view.loss, dict(node.view.options), f"train.{node.view.options_key}"
    if node.stage == "teacher_dpo":
        return "dpo", {"beta": node.view.hp.beta}, "teacher_dpo.beta"
    return "sft", {}, "—"


# ---------------------------------------------------------------------------- rendering

def _md(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "?"


def _front_matter(plan: Any, name: str, loss: str, cached: bool) -> str:
    from huggingface_hub import ModelCardData

    _, spec = _root(plan, name)
    base = _hub_id(spec)
    datasets = sorted({v.source.removeprefix("hf://") for n in [*_ancestors(plan, name), name]
                       for v in _data_views(plan.node(n).view) if v.source.startswith("hf://")})
    tags = ["distill-pipeline", loss, *(["knowledge-distillation"] if cached else [])]
    data = ModelCardData(license="other", library_name="transformers", pipeline_tag="text-generation",
                         base_model=base, base_model_relation="finetune" if base else None,
                         datasets=datasets or None, tags=list(dict.fromkeys(tags)))
    return data.to_yaml()


def render(plan: Any, name: str, folder: Path, manifest: dict) -> str:
    """The card of node `name`, whose output (not yet published) is in `folder`."""
    loss, _, _ = _method(plan, name)
    cache_node = plan.node(name).needs.get("cache")
    sections = [_header(plan, name, folder, loss), _method_section(plan, name, manifest),
                _teachers(plan, name), _cache_section(plan, cache_node, loss), _data(plan, name),
                ["## Evaluation", "", EVAL_BEGIN, "Not evaluated yet: `distill-pipeline run evaluate "
                 "-c <config>` scores it and rewrites this section.", EVAL_END],
                ["## Reproduce", "", *_reproduce(plan, name)], _provenance(manifest)]
    body = "\n\n".join("\n".join(lines) for lines in sections)
    return f"---\n{_front_matter(plan, name, loss, bool(cache_node))}\n---\n\n{body}\n"


def _header(plan: Any, name: str, folder: Path, loss: str) -> list[str]:
    node = plan.node(name)
    root, spec = _root(plan, name)
    return [f"# {name} — {loss} ({plan.run_dir.name})", "",
            f"Trained by [distill-pipeline](#reproduce): node `{name}` (stage `{node.stage}`), "
            f"fingerprint `{plan.fingerprints[name]}`, published as `{plan.folder(name)}`.", "",
            f"- **content identity** `{_identity(folder)}` (weights, forward-relevant config, "
            "tokenizer, chat template — what a cache key calls this model as a teacher)",
            f"- **starts from** {_start(plan, name, root, spec)}",
            f"- **license** {LICENSE_NOTE}"]


def _method_section(plan: Any, name: str, manifest: dict) -> list[str]:
    from distill_pipeline.losses import LOSSES

    node = plan.node(name)
    loss, options, options_from = _method(plan, name)
    doc = ("DPO of the teacher, the SFT teacher as its reference" if node.stage == "teacher_dpo"
           else LOSSES[loss].doc)
    lines = ["## Method", "", f"`{loss}` — {doc}" if doc else f"`{loss}`", "",
             "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_md(v)}` |" for k, v in options.items()] or ["| — | — |"]
    lines += ["", f"Loss options from `{options_from}`; hyper-parameters from "
                  f"`{node.view.origins()['hp']}`:", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_md(v)}` |" for k, v in node.view.hp.model_dump(mode="json").items()]
    return lines + ["", "Result of training: " + ", ".join(f"{k} `{v}`" for k, v in manifest["summary"].items())]


def _teachers(plan: Any, name: str) -> list[str]:
    """The teachers whose cached log-probs it trained on (identities as the extraction keyed
    them), its DPO reference and the model it started from."""
    node = plan.node(name)
    rows = []
    if "cache" in node.needs:
        from distill_pipeline.cache.node import node_meta

        by_path = {str(plan.folder(n.name) / MODEL): f"{n.name}-{plan.fingerprints[n.name][:12]}"
                   for n in plan.nodes}
        for role, t in node_meta(plan.folder(node.needs["cache"]))["teachers"].items():
            rows.append(f"| {role} (cache) | `{by_path.get(t['path'], t['path'])}` | `{t['identity']}` |")
    for role, what in (("reference", "DPO reference"), ("init", "initial weights")):
        up = node.needs.get(role)
        if up and not (role == "reference" and up == node.needs.get("init")):  # DPO/WPO: the start
            rows.append(f"| {what} | `{up}-{plan.fingerprints[up][:12]}` | `{_identity(plan.folder(up))}` |")
    return ["## Teachers, references, starting weights", "", "| role | node | identity |", "|---|---|---|",
            *(rows or ["| — | — | none: trained from data alone |"])]


def _cache_section(plan: Any, cache_node: str | None, loss: str) -> list[str]:
    if not cache_node:
        return ["## Teacher-logit cache", "", f"None: `{loss}` reads no teacher log-probs."]
    from distill_pipeline.cache.format import SCHEMA_VERSION
    from distill_pipeline.cache.node import node_meta

    meta = node_meta(plan.folder(cache_node))
    return ["## Teacher-logit cache", "",
            f"Read from node `{cache_node}-{plan.fingerprints[cache_node][:12]}` ({meta['source']}), "
            f"store `{meta['store']}`, cache schema {SCHEMA_VERSION}; entry format:", "",
            "| field | value |", "|---|---|", *(f"| `{k}` | `{_md(v)}` |" for k, v in meta["format"].items())]


def _data(plan: Any, name: str) -> list[str]:
    """Every dataset the model's lineage read (its own node and every node upstream)."""
    lines = ["## Data", "", "| node | dataset | source | details |", "|---|---|---|---|"]
    for n in [*_ancestors(plan, name), name]:
        for v in _data_views(plan.node(n).view):
            details = {k: getattr(v, k) for k in ("layout", "split", "limit", "sha256", "max_length")
                       if getattr(v, k) is not None}
            lines.append(f"| `{n}` | `data.{v.which}` | `{_md(v.source)}` | "
                         + ", ".join(f"{k} `{_md(x)}`" for k, x in details.items()) + " |")
    rollouts = plan.node(name).needs.get("rollouts")
    if rollouts:
        lines.append(f"| `{name}` | rollouts | node `{rollouts}` | the student's own responses to the "
                     "preference prompts |")
    return lines


def _provenance(manifest: dict) -> list[str]:
    timings = manifest.get("timings", {})
    inputs = ", ".join(f"{role} `{i['node']}-{i['fingerprint'][:12]}`"
                       for role, i in manifest["inputs"].items())
    return ["## Provenance", "",
            f"- host `{manifest.get('host')}`; started {_when(timings.get('started'))}, finished "
            f"{_when(timings.get('finished'))} ({timings.get('seconds')} s)",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
            f"- inputs: {inputs or 'none'}"]


def _start(plan: Any, name: str, root: str, spec: Any) -> str:
    if spec is None:
        return f"node `{root}`"
    what = (f"preset `{spec.preset}` (random-initialised, built locally: no hub model)" if spec.preset
            else f"`{spec.name_or_path}`" + (" (hub)" if _hub_id(spec) else " (local directory)"))
    via = "" if root == name else f", through node `{root}`"
    return f"{what}{via}"


def _reproduce(plan: Any, name: str) -> list[str]:
    import yaml

    folder = f"{plan.run_dir.name}/{name}-{plan.fingerprints[name][:12]}"
    inv = plan.invocation
    out = []
    if inv:
        cmd = ["distill-pipeline", "run", name, "-c", inv["config"]]
        for s in inv["sets"]:
            cmd += ["--set", s]
        digest = f" (sha256 `{inv['config_sha256']}` when it ran)" if inv.get("config_sha256") else ""
        out += ["As run, from the working directory `" + inv["cwd"] + "`:", "", "```bash",
                shlex.join(cmd), "```", "", f"with the config file as it was then{digest}.", ""]
    else:
        out += ["Run through the Python API (`pipeline.runner.run`), not the command line: no "
                "command line was recorded.", ""]
    resolved = yaml.safe_dump(plan.cfg.model_dump(mode="json"), sort_keys=False).rstrip()
    out += ["From the resolved config below (every value, defaults included), saved as "
            "`config.yaml` in the same working directory (relative paths in it are relative to it):",
            "", "```bash", f"distill-pipeline run {shlex.quote(name)} -c config.yaml", "```", "",
            f"builds the same node: `{folder}` (same fingerprint) — or finds it up to date.", "",
            "<details><summary>resolved config</summary>", "", "```yaml", resolved, "```", "",
            "</details>"]
    return out


def _evaluation(plan: Any, name: str, folder: Path, role: str, results: dict) -> str:
    """The evaluation section of model `role`'s card, from evaluate node `name`'s results."""
    from distill_pipeline.metrics import METRICS, SCORES

    row = results[role]
    view = plan.node(name).view
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = [f"Scored by node `{name}-{plan.fingerprints[name][:12]}` (finished "
             f"{_when(manifest['timings']['finished'])}) on `data.eval` (`{_md(view.data.source)}`, "
             f"{row.get('n', '?')} prompts, greedy, up to {view.evaluate.max_new_tokens} new tokens). "
             "Win rates are against `sft.student` (ties count half).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {m} | {row[m]:.4f} |" for m in (*METRICS, *SCORES) if isinstance(row.get(m), (int, float))]
    others = [r for r in results if r != role]
    if others:
        lines += ["", "Other models scored in the same run: " + ", ".join(f"`{r}`" for r in others)
                  + f" (`{folder}/results.json`)."]
    return "\n".join(lines)

