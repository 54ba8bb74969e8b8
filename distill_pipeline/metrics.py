"""Scoring shared by stages: reference log-probs for DPO-style losses, and held-out metrics
(task accuracy, reward accuracy, mean generated length)."""
from __future__ import annotations


def pair_logps(model, examples, pad_id, batch_size=64):
    """Summed log-probs and lengths of chosen and rejected for every pair: four (N,) tensors."""
    import torch

    from distill_pipeline.data.tokenize import collate, sequence_logps

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


def reference_logps(model, examples, pad_id, batch_size=64):
    """Summed reference log-probs of chosen and rejected for every pair: two lists of floats."""
    sw, _, sl, _ = pair_logps(model, examples, pad_id, batch_size)
    return sw.tolist(), sl.tolist()


def evaluate_model(model, tok, examples, *, batch_size: int, max_new_tokens: int, desc: str = "evaluate") -> dict:
    """task_accuracy (rows with `answer`: greedy output == answer), reward_accuracy (chosen gets the
    higher mean log-prob), mean_length (generated tokens, EOS included)."""
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.generation import generate_hf

    sw, nw, sl, nl = pair_logps(model, examples, tok.pad_token_id, batch_size)
    wins = int((sw / nw.clamp(min=1) > sl / nl.clamp(min=1)).sum())
    responses = generate_hf(model, tok, [e["prompt_ids"] for e in examples],
                            max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    result = {"reward_accuracy": wins / len(examples),
              "mean_length": sum(map(len, responses)) / len(responses), "n": len(examples)}
    if all("answer" in e for e in examples):
        correct = sum(decode_response(tok, r).strip() == e["answer"] for e, r in zip(examples, responses))
        result["task_accuracy"] = correct / len(examples)
    return result
