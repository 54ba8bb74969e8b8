"""Scoring shared by stages: sequence log-probs, the reference log-probs of DPO-style losses,
held-out metrics (task accuracy, reward accuracy, mean generated length, task reward) and their
table."""
from __future__ import annotations

from typing import Any

METRICS = ("task_accuracy", "reward_accuracy", "mean_length", "task_reward")
# With a reward model (`rm_*`) and the teacher judge (`judge_*`): mean score of the greedy
# responses, and win rate vs the SFT student (evaluate stage).
SCORES = ("rm_reward", "rm_win_rate", "judge_reward", "judge_win_rate")


def sequence_logps(model, ids, mask, labels):
    """Per-sequence summed label log-probs and token counts: (B,), (B,). Log-softmax in float32."""
    from distill_pipeline.losses import IGNORE, token_logps

    dev = next(model.parameters()).device
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    return token_logps(logits, target).sum(-1), (target != IGNORE).sum(-1)


def pair_logps(model, examples, pad_id, batch_size=64):
    """Summed log-probs and lengths of chosen and rejected for every pair: four (N,) tensors."""
    import torch

    from distill_pipeline.data.tokenize import collate

    parts = {f: ([], []) for f in ("chosen_ids", "rejected_ids")}
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            for field, (sums, lens) in parts.items():
                lp, n = sequence_logps(model, *collate([e["prompt_ids"] for e in chunk],
                                                       [e[field] for e in chunk], pad_id))
                sums.append(lp.cpu())
                lens.append(n.cpu())
    (sw, nw), (sl, nl) = ((torch.cat(a), torch.cat(b)) for a, b in parts.values())
    return sw, nw, sl, nl


def attach_policy_ref(examples: list[dict], ref, pad_id: int, strategy: str = "ddp", *,
                      model: Any = None, batch_size: int = 64) -> None:
    """Store the reference model's summed log-probs of chosen and rejected on every pair, as
    `policy_ref_logp_w` / `policy_ref_logp_l` (the DPO-style losses' inputs of those names).
    `ref` is the reference's `models.ModelRef`; `model`: that model, already loaded (the policy
    before training when it starts from the reference: no second copy is loaded). Under data
    parallelism each worker scores every N-th pair (the same number on every rank) and the
    workers exchange the results; a reference loaded here is placed like the policy (`strategy`:
    a replica, or FSDP shards). `batch_size` pairs are scored at a time (their logits over the
    vocabulary are the scoring's peak memory)."""
    from distill_pipeline import parallel
    from distill_pipeline.losses import POLICY_REF
    from distill_pipeline.models import load_ref

    if not examples:
        return
    group = parallel.group()
    if model is None:
        model, _ = load_ref(ref)
        if group.world > 1 and strategy == "fsdp":
            parallel.shard(model, "fsdp")
    mine = list(range(group.rank, len(examples), group.world))
    share = -(-len(examples) // group.world)
    mine += (mine[-1:] or [0]) * (share - len(mine))  # pad: FSDP's forward is collective
    sw, _, sl, _ = pair_logps(model, [examples[i] for i in mine], pad_id, batch_size)
    for part in parallel.all_gather(list(zip(mine, sw.tolist(), sl.tolist()))):
        for i, w, l in part:
            examples[i][f"{POLICY_REF}_w"], examples[i][f"{POLICY_REF}_l"] = w, l


def evaluate_model(model, tok, examples, *, batch_size: int, max_new_tokens: int, desc: str = "evaluate",
                   with_responses: bool = False):
    """task_accuracy (rows with `answer`: greedy output == answer), task_reward (rows with
    `answer`: mean partial credit of the greedy output, `task_rewards`), reward_accuracy (chosen
    gets the higher mean log-prob), mean_length (generated tokens, EOS included). With
    `with_responses`, (that dict, the greedy responses' token ids)."""
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.generation import generate_hf

    sw, nw, sl, nl = pair_logps(model, examples, tok.pad_token_id, batch_size)
    wins = int((sw / nw.clamp(min=1) > sl / nl.clamp(min=1)).sum())
    responses = generate_hf(model, tok, [e["prompt_ids"] for e in examples],
                            max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    result = {"reward_accuracy": wins / len(examples),
              "mean_length": sum(map(len, responses)) / len(responses), "n": len(examples)}
    rewards = task_rewards(tok, examples, responses)
    if rewards is not None:
        correct = sum(decode_response(tok, r).strip() == e["answer"] for e, r in zip(examples, responses))
        result["task_accuracy"] = correct / len(examples)
        result["task_reward"] = sum(rewards) / len(rewards)
    return (result, responses) if with_responses else result


def task_rewards(tok, examples: list[dict], responses: list[list[int]]) -> list[float] | None:
    """Per example, the partial credit of the response against the row's `answer` (1 − edit
    distance / longer length; data.ranked.partial_credit); None unless every row has an answer."""
    from distill_pipeline.data.ranked import partial_credit
    from distill_pipeline.data.tokenize import decode_response

    if not examples or not all("answer" in e for e in examples):
        return None
    return [partial_credit(decode_response(tok, r), e["answer"]) for e, r in zip(examples, responses)]


def results_table(rows: dict[str, dict], first: str = "model") -> str:
    """Fixed-width table: one row per model/method, one column per metric ('-' when absent); the
    reward-model and judge columns only when some row has them."""
    width = max(len(k) for k in [first, *rows]) + 2
    columns = [*METRICS, *(m for m in SCORES if any(m in r for r in rows.values()))]
    out = [first.ljust(width) + "".join(m.rjust(17) for m in columns)]
    for label, r in rows.items():
        out.append(label.ljust(width) + "".join(
            (f"{r[m]:.3f}" if isinstance(r.get(m), (int, float)) else "-").rjust(17) for m in columns))
    return "\n".join(out)
