"""Scoring shared by stages: reference log-probs for DPO-style losses, and held-out metrics
(task accuracy, reward accuracy, mean generated length)."""
from __future__ import annotations


def reference_logps(model, examples, pad_id, batch_size=64):
    """Summed reference log-probs of chosen and rejected for every pair: two lists of floats."""
    import torch

    from distill_pipeline.data.tokenize import collate, sequence_logps

    out_w, out_l = [], []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            for field, acc in (("chosen_ids", out_w), ("rejected_ids", out_l)):
                ids, mask, labels = collate([e["prompt_ids"] for e in chunk],
                                            [e[field] for e in chunk], pad_id)
                acc.extend(sequence_logps(model, ids, mask, labels)[0].tolist())
    return out_w, out_l


def evaluate_model(model, tok, examples, *, batch_size: int, max_new_tokens: int, desc: str = "evaluate") -> dict:
    """task_accuracy (rows with `answer`: greedy output == answer), reward_accuracy (chosen gets the
    higher mean log-prob), mean_length (generated tokens, EOS included)."""
    import torch

    from distill_pipeline.data.tokenize import collate, decode_response, sequence_logps
    from distill_pipeline.generation import generate_hf

    wins = 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            prompts = [e["prompt_ids"] for e in chunk]
            means = []
            for field in ("chosen_ids", "rejected_ids"):
                lp, n = sequence_logps(model, *collate(prompts, [e[field] for e in chunk], tok.pad_token_id))
                means.append(lp / n.clamp(min=1))
            wins += int((means[0] > means[1]).sum())
    responses = generate_hf(model, tok, [e["prompt_ids"] for e in examples],
                            max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    result = {"reward_accuracy": wins / len(examples),
              "mean_length": sum(map(len, responses)) / len(responses), "n": len(examples)}
    if all("answer" in e for e in examples):
        correct = sum(decode_response(tok, r).strip() == e["answer"] for e, r in zip(examples, responses))
        result["task_accuracy"] = correct / len(examples)
    return result
