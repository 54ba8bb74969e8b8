"""Chat formatting, tokenisation and batch collation shared by every stage.

A sequence is `prompt_ids + response_ids`: the prompt is the chat template applied to the prompt
messages with the generation prompt, the response is the raw text plus the EOS token. Labels are
-100 on the prompt and on padding, so `logits[:, :-1]` predicts `labels[:, 1:]`.
"""
from __future__ import annotations

from typing import Any, Sequence

from distill_pipeline.losses import IGNORE  # the loss functions' convention


def encode_prompt(tok: Any, messages: list[dict]) -> list[int]:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return list(ids)


def encode_response(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]


def decode_response(tok: Any, ids: Sequence[int]) -> str:
    ids = list(ids)
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


def encode_rows(tok: Any, rows: list[dict], fields: Sequence[str], max_length: int, bad: Any) -> list[dict]:
    """Tokenise each row's prompt and the given response fields; rows over `max_length`
    (prompt + longest response) are reported to `bad` and dropped."""
    out = []
    for row in rows:
        prompt = encode_prompt(tok, row["prompt"])
        enc = {"prompt_ids": prompt, **{f"{f}_ids": encode_response(tok, row[f]) for f in fields}}
        longest = max(len(enc[f"{f}_ids"]) for f in fields)
        if len(prompt) + longest > max_length:
            bad.add(row.get("row", -1), f"longer than data.max_length={max_length} tokens")
            continue
        out.append({**row, **enc})
    return out


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels), each (B, T) long tensors."""
    import torch

    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(p):len(s)] = torch.tensor(s[len(p):])
    return ids, mask, labels


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """Left-padded prompts for generation: (input_ids, attention_mask), each (B, T)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    return ids, mask
