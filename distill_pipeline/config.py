"""The run configuration: one typed tree loaded from YAML, with `--set a.b=c` overrides.

`load_config(path, overrides)` returns a validated, frozen `Config` or raises `ConfigError`
naming the config path, what was wrong and the accepted values — before any stage runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from distill_pipeline.cache.format import CacheFormat, FormatError
from distill_pipeline.losses import LOSSES, METHODS, TWO_PHASE, method_loss
from distill_pipeline.trackers import EXTRA, TRACKERS, missing

Method = Literal[METHODS]  # type: ignore[valid-type]
TrackerName = Literal[tuple(TRACKERS)]  # type: ignore[valid-type]
Layout = Literal["auto", "messages", "prompt_completion", "pairs", "conversational", "scored"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the config path and the fix."""


class Section(BaseModel):
    """A section of the config tree: unknown keys refused, frozen once loaded."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/yes would otherwise pass as 1 for a number (`train.epochs: true`)."""
        if isinstance(value, bool):
            ann = cls.model_fields[info.field_name].annotation
            if bool not in (get_args(ann) or (ann,)) and {int, float} & set(get_args(ann) or (ann,)):
                raise ValueError(f"expected a number, got the boolean {value}")
        return value


class ModelSpec(Section):
    """A causal LM: a tiny offline preset, a local checkpoint directory, or a hub id."""
    preset: Literal["tiny-teacher", "tiny-student"] | None = None
    name_or_path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="auto: the dtype in the checkpoint's config.json (presets: float32)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.name_or_path is None):
            raise ValueError("give exactly one of `preset` (tiny-teacher, tiny-student) or "
                             "`name_or_path` (a hub id or a local directory)")
        return self


class Models(Section):
    """The models a run trains from, and the ones it imports instead of training.

    `teacher` / `student` are the starting points of `sft.teacher` / `sft.student`. An import
    replaces a trained node: `teacher_dpo` (an aligned teacher) replaces the teacher DPO,
    `reference` (the model it was DPO-trained from) replaces `sft.teacher`, `student_init` (an SFT'd
    student) replaces `sft.student`."""
    teacher: ModelSpec | None = None
    student: ModelSpec | None = None
    teacher_dpo: ModelSpec | None = Field(None, description="import an aligned (DPO) teacher")
    reference: ModelSpec | None = Field(None, description="import the teacher's pre-DPO (SFT) model")
    student_init: ModelSpec | None = Field(None, description="import an SFT'd student")

    @model_validator(mode="after")
    def _imports_are_checkpoints(self):
        for name in IMPORTS:
            spec = getattr(self, name)
            if spec is not None and spec.preset is not None:
                raise ValueError(f"models.{name}: an import is a checkpoint (name_or_path: a local "
                                 "directory or hub id), not a random preset")
        return self


# The import that replaces each trained node (models.<import> → node).
IMPORTS = {"teacher_dpo": "teacher_dpo", "reference": "sft.teacher", "student_init": "sft.student"}


class NumbersTask(Section):
    """Sizes of the built-in numbers → digits task."""
    n_sft: int = Field(2000, ge=1)
    n_pairs: int = Field(2000, ge=1)
    n_eval: int = Field(200, ge=1)
    n_validation: int = Field(100, ge=1)
    max_value: int = Field(9999, ge=9, le=999_999)
    noise: float = Field(0.6, ge=0.0, le=1.0, description="share of zero-containing SFT answers written without their zeros")
    seed: int = 0


# Two classes, not one with two instances: each writer needs its own defaults, so that
# `--set data.ranked.demos.digit_error=…` keeps the other demos defaults (a partial override
# validates against the class).
class DemoWriter(Section):
    """The imperfect writer of the `numbers-ranked` task's SFT completions (docs/TASKS.md)."""
    digit_error: float = Field(0.03, ge=0.0, le=1.0, description="chance of a slip per digit")
    zero_drop: float = Field(0.3, ge=0.0, le=1.0, description="chance of dropping silent zeros")
    teen_confusion: float = Field(0.3, ge=0.0, le=1.0, description="chance of a teen/-ty swap (14 ↔ 40)")


class SampleWriter(Section):
    """The imperfect policy whose two answers make each `numbers-ranked` preference pair."""
    digit_error: float = Field(0.12, ge=0.0, le=1.0, description="chance of a slip per digit")
    zero_drop: float = Field(0.6, ge=0.0, le=1.0, description="chance of dropping silent zeros")
    teen_confusion: float = Field(0.6, ge=0.0, le=1.0, description="chance of a teen/-ty swap (14 ↔ 40)")


class RankedTask(Section):
    """The built-in `numbers-ranked` task's writers: `demos` writes the SFT completions, `samples`
    the two responses of every preference pair (ranked by partial credit). Sizes and seed come
    from `data.numbers` (its `noise` is the numbers task's own and is not read here)."""
    demos: DemoWriter = DemoWriter()
    samples: SampleWriter = SampleWriter()


# Built-in tasks (`builtin:<name>`), described in docs/TASKS.md.
BUILTIN_TASKS = ("numbers", "numbers-ranked")


class DataSpec(Section):
    """One dataset: a built-in task, a local JSONL/Parquet file, or `hf://owner/name`."""
    source: str = Field(..., description="'builtin:numbers' (or another built-in task), a "
                        ".jsonl/.parquet path, or hf://id")
    layout: Layout = "auto"
    split: str = "train"
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _source_exists(self):
        s = self.source
        if s.startswith("builtin:"):
            if s.removeprefix("builtin:") not in BUILTIN_TASKS:
                raise ValueError(f"unknown built-in dataset {s!r}; accepted: "
                                 + ", ".join(f"builtin:{t}" for t in BUILTIN_TASKS))
        elif not s.startswith("hf://"):
            p = Path(s).expanduser()
            if p.suffix not in (".jsonl", ".json", ".parquet"):
                raise ValueError(f"{s!r}: accepted sources are builtin:numbers, hf://<dataset id>, "
                                 "or a .jsonl / .json / .parquet file")
            if not p.exists():
                raise ValueError(f"file not found: {s}")
            if not p.is_file():
                raise ValueError(f"{s} is a directory; give a .jsonl / .json / .parquet file")
        return self


class Data(Section):
    sft: DataSpec
    preferences: DataSpec
    eval: DataSpec
    validation: DataSpec | None = Field(None, description="pairs for the train stage's validation "
                                        "reward accuracy (tune here, report on eval)")
    numbers: NumbersTask = NumbersTask()
    ranked: RankedTask = RankedTask()
    max_length: int = Field(256, ge=8, description="prompt + response tokens; longer rows are skipped")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0,
                                    description="refuse a dataset with more bad rows than this")
    chat_template: str | None = Field(None, description="a Jinja chat template (text, or a file "
                                      "path) that replaces every model's own; needed for models "
                                      "without one")

    @field_validator("chat_template")
    @classmethod
    def _template_readable(cls, value: str | None) -> str | None:
        if value is not None:
            chat_template_text(value)
        return value

    def template(self) -> str | None:
        """The chat template's text (read from its file when a path was given), or None."""
        return None if self.chat_template is None else chat_template_text(self.chat_template)


def chat_template_text(value: str) -> str:
    """`data.chat_template` as Jinja text: a template given inline (it holds `{{` or `{%`), else
    the content of the file it names. Either is compiled as transformers compiles it, so a
    syntax error is refused here (naming the file and line), not inside a stage."""
    if "{{" in value or "{%" in value:
        _check_jinja(value, "the inline template")
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{value!r} is neither a Jinja template (no {{{{ … }}}} or {{% … %}}) nor "
                         "an existing file; give the template text or the path of a .jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{value}: not UTF-8 text (byte {exc.start}); save the template as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"{value}: cannot read the template ({exc.strerror})") from None
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"{value}: the file holds no Jinja expression ({{{{ … }}}} or {{% … %}}); "
                         "is it a chat template?")
    _check_jinja(text, f"file {value}")
    return text


def _check_jinja(text: str, where: str) -> None:
    """Compile a chat template in the environment transformers renders it in (sandboxed, with
    `loopcontrols` and its `{% generation %}` tag); a syntax error, an unknown filter or test
    is a ValueError naming `where` and the line."""
    try:  # installed with torch (and needed by transformers' chat templates)
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return

    class Generation(Extension):  # transformers' AssistantTracker tag, parsed the same way
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    try:
        env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        line = (text.splitlines()[exc.lineno - 1].strip() if exc.lineno and
                exc.lineno <= len(text.splitlines()) else "")
        shown = f" (`{line[:80]}{'…' if len(line) > 80 else ''}`)" if line else ""
        raise ValueError(f"{where}: Jinja syntax error on line {exc.lineno}{shown}: "
                         f"{(exc.message or 'invalid').rstrip('.')}; "
                         "fix the template (transformers compiles it with Jinja2 to format every "
                         "prompt)") from None


class LoraSpec(Section):
    """LoRA adapters (the `peft` library) in place of full fine-tuning: only the adapters train."""
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names (suffixes) that get adapters, or all-linear (every linear layer "
                    "but the LM head)")
    merge: bool = Field(False, description="publish merged full weights as model/ (the adapter "
                        "also goes to adapter/); off: model/ is the adapter, loaded over its base")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module (e.g. q_proj, v_proj) or all-linear")
        return value


class TrainHP(Section):
    """Optimiser settings shared by every training stage."""
    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    workers: int = Field(1, ge=1, description="data-parallel workers (Ray Train when > 1); a step "
                         "takes batch_size × grad_accum × workers examples")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with workers > 1: ddp replicates the "
                                             "model, fsdp shards it per decoder layer (FSDP2)")
    precision: Literal["fp32", "bf16-mixed", "bf16"] = Field(
        "fp32", description="bf16-mixed: bfloat16 autocast, float32 weights and optimizer; bf16: "
        "weights, gradients and optimizer state in bfloat16")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters instead of every weight "
                                  "(`lora: {}` for the defaults)")


# Training sections of the tree (TrainHP), by config path.
TRAIN_SECTIONS = ("sft.teacher", "sft.student", "teacher_dpo", "train")


def ignored_settings(cfg: "Config") -> list[str]:
    """One warning per setting that is valid but has no effect: `strategy: fsdp` with one worker
    (there is nothing to shard over; the node trains exactly as with ddp, unwrapped). Not an
    error: `--set <section>.workers=1` on a sharded config (debugging on one device) is a fair
    request, and the memory plan already estimates such a node unsharded."""
    out = []
    for path in TRAIN_SECTIONS:
        section: Any = cfg
        for part in path.split("."):
            section = getattr(section, part)
        if section.strategy == "fsdp" and section.workers == 1:
            out.append(f"warning: {path}.strategy: fsdp has no effect with {path}.workers: 1 — one "
                       "worker holds the whole model (nothing is sharded; the memory plan counts it "
                       f"unsharded). Set {path}.workers to 2 or more to shard it, or drop strategy.")
    return out


# TrainHP options added after runs existed, at the values that train as before (View.ADDED)
TRAIN_OPTIONS_ADDED = {"workers": 1, "strategy": "ddp", "precision": "fp32", "gradient_checkpointing": False,
                       "lora": None}
HP_ADDED = {f"hp.{k}": v for k, v in TRAIN_OPTIONS_ADDED.items()}


class Sft(Section):
    teacher: TrainHP = TrainHP()
    student: TrainHP = TrainHP()


class TeacherDpo(TrainHP):
    """Defaults are the ADPA paper's teacher DPO (released code: beta 0.01, 1 epoch)."""
    beta: float = Field(0.05, gt=0)
    lr: float = Field(5e-7, gt=0)
    epochs: float = Field(2.0, gt=0)


class Rollouts(Section):
    backend: Literal["auto", "hf", "vllm"] = "auto"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    num_workers: int = Field(1, ge=1, description="Ray workers, each taking whole generation "
                             "batches (not fingerprinted: HF greedy output is the same)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per engine (one engine per worker)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: share of each GPU it may use")
    max_model_len: int | None = Field(None, ge=16, description="vLLM: context length (default: the model's)")


class TeacherLogits(Section):
    top_k: int = Field(50, ge=1, le=1024)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    logp_keep_bits: int | None = Field(None, ge=1, le=22, description="lossy mode: mantissa bits of "
                                       "the log-probs kept (default: all); `cache info` reports the KL")
    top_mass: float | None = Field(None, gt=0, lt=1, description="adaptive K: per token keep the "
                                   "smallest k <= top_k whose probabilities reach this mass (e.g. "
                                   "0.999); the rest joins the tail bin. Default: always top_k")
    min_k: int = Field(1, ge=1, le=1024, description="adaptive K: keep at least this many per token")
    store: str | None = Field(None, description="cache root (shared path for a team); default: "
                              "$DISTILL_CACHE_DIR or ~/.cache/distill-pipeline/teacher-logits")
    unit_tokens: int = Field(16384, ge=1, description="response tokens per published segment")
    num_workers: int = Field(1, ge=1, description="extraction workers (not fingerprinted)")
    batch_tokens: int = Field(4096, ge=16, description="padded tokens per forward batch (not fingerprinted)")
    threads_per_worker: int = Field(1, ge=1, description="torch threads per CPU worker (not fingerprinted)")
    head_chunk_rows: int = Field(1024, ge=1, description="response positions per LM-head chunk: "
                                 "the (rows x vocabulary) float32 logits held at once (not "
                                 "fingerprinted: same ids, log-probs to float32 rounding)")

    @model_validator(mode="after")
    def _valid_format(self):
        try:
            self.format
        except FormatError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def format(self) -> CacheFormat:
        """What the extraction writes: the one place K, dtype and kept bits become a format."""
        return CacheFormat(self.top_k, self.dtype, self.logp_keep_bits, self.top_mass, self.min_k)


class Train(TrainHP):
    loss: dict[str, Any] = Field(default_factory=dict, description="loss options of the method")
    dckd_loss: dict[str, Any] = Field(default_factory=dict,
                                      description="adpa+ only: loss options of its DCKD phase")


class RewardModel(Section):
    """A Hugging Face sequence-classification reward model (one output), with its own tokenizer
    and chat template: a local directory or a hub id."""
    name_or_path: str = Field(..., min_length=1)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    batch_size: int = Field(16, ge=1)


class Evaluate(Section):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    reward_model: RewardModel | None = Field(None, description="score every model's greedy "
                                             "responses; win rate vs the SFT student")
    teacher_judge: bool = Field(True, description="win rate vs the SFT student by the DPO "
                                "teacher's implicit reward log π_dpo(y|x) − log π_ref(y|x)")


class Resources(Section):
    """Ray resource requests per task."""
    train_cpus: float = Field(1, gt=0)
    generate_cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU, for the memory "
                                        "plan (default: the visible GPU's); needs gpus > 0")

    @field_validator("gpu_memory_gb")
    @classmethod
    def _gpu_memory_needs_gpus(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("gpus") == 0:  # `gpus` is validated first
            raise ValueError("given, but resources.gpus is 0: no task uses a GPU, so the memory plan "
                             "would check every node against this machine's RAM and ignore it. Set "
                             "resources.gpus (GPUs per task, e.g. 1) to plan for that GPU, or remove "
                             "resources.gpu_memory_gb to run on CPU")
        return value


class RayCfg(Section):
    address: str | None = Field(None, description="attach to a cluster; default: embedded local")
    num_cpus: int | None = Field(None, ge=1)


class Config(Section):
    run_dir: str = Field(..., min_length=1, description="where every node's output folder goes")
    method: Method = "adpa"
    models: Models
    data: Data
    sft: Sft = Sft()
    teacher_dpo: TeacherDpo = TeacherDpo()
    rollouts: Rollouts = Rollouts()
    teacher_logits: TeacherLogits = TeacherLogits()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    resources: Resources = Resources()
    ray: RayCfg = RayCfg()
    report_to: list[TrackerName] = Field(  # type: ignore[valid-type]
        default_factory=list, description="experiment trackers every training node and evaluate "
        "report to: tensorboard, wandb, mlflow (not fingerprinted)")
    _loss_options: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_known_and_installed(cls, value: Any) -> list[str]:
        """Refused at load: an unknown tracker, or one whose package is not installed (a run
        must not train for an hour and then fail to report)."""
        names = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a list of trackers ({', '.join(TRACKERS)})")
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; accepted: {', '.join(TRACKERS)}")
        absent = missing(names)
        if absent:
            raise ValueError(f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not "
                             f"installed: {EXTRA} (or remove it from report_to)")
        return list(dict.fromkeys(names))

    def loss_options(self, key: Literal["loss", "dckd_loss"] = "loss", source: str = "<config>") -> dict[str, Any]:
        """The validated options (defaults filled in) of the loss that `train.loss` or, for adpa+,
        `train.dckd_loss` configures: checked when the config is loaded (`config_from_dict`),
        computed once. Types, bounds and choices come from the loss's signature."""
        if key not in self._loss_options:
            self._loss_options[key] = _validated_loss_options(self, f"train.{key}", source)
        return self._loss_options[key]

    @model_validator(mode="after")
    def _models_needed(self):
        m = self.models
        if m.teacher_dpo is not None and m.reference is None and needs_reference(self.method):
            raise ValueError(
                f"models.reference: method {self.method} needs the imported teacher's reference "
                "model: its loss scores the student's rollouts with log π_dpo − log π_ref (the "
                "teacher's advantage), so both the DPO teacher and the model it was DPO-trained "
                "from are read. Add models.reference (e.g. the SFT model the teacher_dpo started "
                "from), or pick a method that reads only the DPO teacher ("
                + ", ".join(m for m in METHODS if LOSSES.get(m) and LOSSES[m].cache == "pairs") + ")")
        for node, model in (("sft.teacher", "teacher"), ("sft.student", "student")):
            if getattr(m, model) is None and node in trained_nodes(self):
                why = ("the teacher DPO trains from it" if model == "teacher" and m.reference is None
                       and m.teacher_dpo is None else f"node {node} trains from it")
                alt = {"teacher": "models.teacher_dpo (+ models.reference where the method needs it)",
                       "student": "models.student_init"}[model]
                raise ValueError(f"models.{model} is required: {why}; give it, or import instead "
                                 f"with {alt}")
        return self


def needs_reference(method: str) -> bool:
    """Does some loss of the method read the reference teacher (ADPA's rollout extraction)?"""
    return any(LOSSES[loss].cache == "rollouts" for loss in TWO_PHASE.get(method, (method,)))


def trained_nodes(cfg: "Config") -> set[str]:
    """The SFT nodes that train (not imported, and needed): `sft.teacher` is needed by a teacher
    DPO that trains, or as the reference of a method that reads one."""
    m, nodes = cfg.models, set()
    if m.student_init is None:
        nodes.add("sft.student")
    if m.reference is None and (m.teacher_dpo is None or needs_reference(cfg.method)):
        nodes.add("sft.teacher")
    return nodes


def unused_models(cfg: "Config") -> list[str]:
    """One line per model given but read by no node (an import replaced what trains from it)."""
    trained = trained_nodes(cfg)
    return [f"note: models.{model} is not used: {node} is imported from models.{imp}"
            if getattr(cfg.models, imp) is not None else
            f"note: models.{model} is not used: method {cfg.method} with an imported teacher_dpo "
            "reads no reference teacher"
            for model, node, imp in (("teacher", "sft.teacher", "reference"),
                                     ("student", "sft.student", "student_init"))
            if getattr(cfg.models, model) is not None and node not in trained]


def _unalias(node: Any) -> Any:
    """Copy without sharing: YAML anchors/aliases load as one shared object, and an override of
    `a.x` must not also change an aliased sibling `b.x`."""
    if isinstance(node, dict):
        return {k: _unalias(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unalias(v) for v in node]
    return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"`{key}` is given twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _set(tree: dict, dotted: str, raw: str, source: str) -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"--set {source!r}: {'empty key' if not dotted else 'empty part in key ' + repr(dotted)}; "
                          "expected key.path=value, e.g. --set teacher_dpo.beta=0.1")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {source!r}: the value is not valid YAML ({exc.problem}); quote it") from None
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {source}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _accepted(model: type[BaseModel], loc: tuple) -> str:
    """The keys accepted at `loc` in the tree, for unknown-key messages."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return ""
        ann = field.annotation
        cands = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cands:
            return ""
        model = cands[0]
    return ", ".join(model.model_fields)


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            accepted = _accepted(Config, loc)
            msg = f"unknown key; accepted here: {accepted}" if accepted else "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict) and "got" not in msg:
            msg += f" (got {e['input']!r})"
        lines.append(f"  {path}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply `a.b=c` overrides (values parsed as YAML scalars), validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config {path} is a directory, not a YAML file; pass -c path/to/config.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    tree = _unalias(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw, item)
    return config_from_dict(tree, source=str(path))


def config_from_dict(tree: dict, *, source: str = "<dict>") -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    cfg.loss_options("loss", source)
    if cfg.train.dckd_loss and cfg.method not in TWO_PHASE:
        raise ConfigError(f"invalid config {source}:\n  train.dckd_loss: only used by method adpa+ "
                          f"(method is {cfg.method}); remove it or use train.loss")
    cfg.loss_options("dckd_loss", source)
    return cfg


def _validated_loss_options(cfg: Config, path: str, source: str) -> dict[str, Any]:
    loss = TWO_PHASE[cfg.method][0] if path == "train.dckd_loss" and cfg.method in TWO_PHASE else method_loss(cfg.method)
    given = getattr(cfg.train, path.rsplit(".", 1)[1])
    model = LOSSES[loss].options_model
    try:
        return model.model_validate(given).model_dump()
    except ValidationError as exc:
        lines = [f"invalid config {source}:"]
        accepted = ", ".join(model.model_fields) or "(none)"
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"  {path}.{key}: unknown option for method {cfg.method} ({loss} loss); "
                             f"accepted: {accepted}")
            elif e["type"] == "literal_error":
                choices = ", ".join(map(str, get_args(model.model_fields[key].annotation)))
                lines.append(f"  {path}.{key}: {e['input']!r} is not one of {choices}")
            else:
                lines.append(f"  {path}.{key}: {e['msg']} (got {e['input']!r})")
        raise ConfigError("\n".join(lines)) from None
