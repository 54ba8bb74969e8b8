"""Scoring responses with a reward model, and the DPO teacher's implicit reward.

An external reward model (a Hugging Face sequence-classification checkpoint with one output and
its own tokenizer + chat template) scores each (prompt messages, response text) conversation; the
`evaluate` stage compares models through `win_rate` of those scores against a baseline.
`implicit_rewards` is the DPO view of the same question: log π_policy(y|x) − log π_ref(y|x)
summed over the response tokens (without beta), on this pipeline's own token ids.
"""
from __future__ import annotations

from typing import Any, Sequence

from distill_pipeline.progress import progress


def load_reward_model(name_or_path: str, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification reward model from a local directory, the
    local hub cache or a hub id. Model in eval mode on `models.device()`, with
    `config.pad_token_id` set (the score is read at the last non-pad token). ModelError (what,
    where, what to do) for: unusable files, num_labels != 1, a score head missing from the
    weights, a tokenizer without chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from distill_pipeline import models as m

    m._quiet_transformers()
    prefix = f"cannot load reward model from {name_or_path!r}"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, str(dtype), None)
    if torch_dtype != "auto" and not isinstance(torch_dtype, torch.dtype):
        raise m.ModelError(f"{prefix}: unknown dtype {dtype!r}; use float32, bfloat16, float16 "
                           "or auto.")
    src = m._resolve(name_or_path, prefix)
    if src.local is not None:  # cheap file checks first; the chat template is checked below
        problems = m._dir_problems(src.local, model=True, tokenizer=True, template=False)
        if problems:
            raise m._error(prefix, problems, src.todo())

    try:
        config = AutoConfig.from_pretrained(src.load_from)
    except Exception as exc:  # transformers raises many types; the user needs one message
        raise m._load_failed(src, prefix, exc, model=True) from exc
    if config.num_labels != 1:
        labels = list((getattr(config, "id2label", None) or {}).values())
        raise m.ModelError(
            f"{prefix}: its config has num_labels={config.num_labels} (labels {labels}), but a "
            "reward model outputs one scalar score (num_labels=1). Point at a sequence-"
            "classification reward model; a classifier with several classes, or a causal LM "
            "(whose config defaults to num_labels=2), is not one.")

    try:
        tok = AutoTokenizer.from_pretrained(src.load_from)
    except Exception as exc:
        raise m._load_failed(src, prefix, exc, model=False) from exc
    if not tok.chat_template:
        where = f" in {src.local}" if src.local is not None else ""
        raise m.ModelError(
            f"{prefix}: its tokenizer has no chat template{where}. The reward model scores "
            "conversations rendered with the template it was trained with: add that template "
            "as chat_template.jinja next to the tokenizer, or use a reward model that ships one.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise m.ModelError(f"{prefix}: its tokenizer has neither a pad nor an EOS token, so "
                           "batches cannot be padded. Set pad_token in its tokenizer_config.json.")

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            src.load_from, dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:
        raise m._load_failed(src, prefix, exc, model=True) from exc
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise m.ModelError(
            f"{prefix}: the checkpoint lacks {len(missing)} weight(s) of a sequence-"
            f"classification model ({', '.join(sorted(missing)[:3])}{' …' if len(missing) > 3 else ''}"
            "), which would be randomly initialised: it is not a trained reward model (a causal "
            "LM checkpoint has no score head). Point at a reward model checkpoint.")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(m.device()).eval(), tok


def _chat_ids(tok: Any, messages: list[dict]) -> list[int]:
    """The full conversation rendered by the tokenizer's own template, as token ids."""
    enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc  # transformers 5: BatchEncoding
    return list(ids)


def reward_scores(model: Any, tok: Any, prompts: list[list[dict]], responses: list[str], *,
                  batch_size: int = 16, desc: str = "reward") -> list[float]:
    """The reward model's scalar score of each `prompt + [assistant: response]` conversation, in
    input order. Batches are right-padded with the model's pad id (sorted by length to pad
    little); a score does not depend on which other items share its batch."""
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"reward_scores: {len(prompts)} prompts but {len(responses)} responses; "
                         "pass one response per prompt")
    if batch_size < 1:
        raise ValueError(f"reward_scores: batch_size must be >= 1, got {batch_size}")
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = tok.pad_token_id
    seqs = [_chat_ids(tok, list(p) + [{"role": "assistant", "content": r}])
            for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    dev = next(model.parameters()).device
    out: list[float] = [0.0] * len(seqs)
    with torch.no_grad(), progress(total=len(seqs), desc=desc, unit="seq") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits  # (B, 1)
            for i, score in zip(idx, logits[:, 0].float().cpu().tolist()):
                out[i] = float(score)
            bar.update(len(idx))
    return out


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of items whose score beats the baseline's; a tie counts half."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores but {len(baseline)} baseline scores; "
                         "both must score the same items")
    if not scores:
        raise ValueError("win_rate: no scores (empty input); there is nothing to compare")
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline))
    return wins / len(scores)


def implicit_rewards(policy: Any, reference: Any, prompt_ids: list[list[int]],
                     response_ids: list[list[int]], *, pad_id: int,
                     batch_size: int = 16) -> list[float]:
    """DPO implicit reward of each response (no beta): Σ_t log π_policy(y_t|x, y_<t) −
    Σ_t log π_reference(y_t|x, y_<t) over the response tokens. Models are used as given
    (eval mode expected)."""
    import torch

    from distill_pipeline.data.tokenize import collate
    from distill_pipeline.metrics import sequence_logps

    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"implicit_rewards: {len(prompt_ids)} prompts but {len(response_ids)} "
                         "responses; pass one response per prompt")
    if batch_size < 1:
        raise ValueError(f"implicit_rewards: batch_size must be >= 1, got {batch_size}")
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch_size):
            batch = collate(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size], pad_id)
            lp_policy, _ = sequence_logps(policy, *batch)
            lp_ref, _ = sequence_logps(reference, *batch)
            out.extend(float(v) for v in (lp_policy.float().cpu() - lp_ref.float().cpu()).tolist())
    return out
