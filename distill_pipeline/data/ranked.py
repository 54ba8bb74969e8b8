"""The built-in `numbers-ranked` task: the numbers prompts with preference data shaped like real data.

Real preference sets (DPO-MIX-7K, HelpSteer2, UltraFeedback) rank two *imperfect* responses: the
chosen one is better, not best, and often wrong itself. Here both SFT demonstrations and
preference responses are written by imperfect policies (`ErrorModel`) that make the mistakes a
model of this task makes — systematic ones tied to the prompt's words (silent zeros dropped,
"fourteen" heard as "forty" and back) and random slips (a digit off by one, two digits swapped,
one dropped or doubled; more digits, more slips). Each pair is two samples of the same policy
ranked by `partial_credit` (1 − normalised edit distance to the right digits); ties are resampled
and, when they persist, the prompt is skipped, as real pipelines drop tied pairs. The same
partial credit is the task's evaluation metric (`task_reward`). Design and reasons:
docs/TASKS.md.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from distill_pipeline.data.toy import corrupt, drop_zeros, has_silent_zero, prompt_for, split_numbers

TIE_RETRIES = 8  # resamples of the second response while the two are scored equal


@dataclass(frozen=True)
class ErrorModel:
    """An imperfect writer of answers. `digit_error`: chance of a slip per digit; `zero_drop`:
    chance of writing a number with silent zeros (≥ 100, a 0 digit) without them; `teen_confusion`:
    chance of swapping one teen and -ty word (14 ↔ 40) when the number has one."""
    digit_error: float
    zero_drop: float
    teen_confusion: float

    def answer(self, n: int, rng: random.Random) -> str:
        m = confuse_teen(n, rng) if rng.random() < self.teen_confusion else n
        s = str(m)
        if has_silent_zero(n) and rng.random() < self.zero_drop and drop_zeros(s):
            s = drop_zeros(s)
        for _ in range(sum(rng.random() < self.digit_error for _ in s)):
            s = corrupt(s, rng)
        return s


def confuse_teen(n: int, rng: random.Random) -> int:
    """`n` with one of its three-digit groups' last two digits read as the other of a teen/-ty
    pair (13..19 ↔ 30..90: "fourteen thousand" → 40 000, "forty" → 14); `n` when it has none."""
    groups = [n // 1000, n % 1000]
    spots = [i for i, g in enumerate(groups) if 13 <= g % 100 <= 19 or (g % 100 in range(30, 100, 10))]
    if not spots:
        return n
    i = rng.choice(spots)
    t = groups[i] % 100
    groups[i] += (t - 10) * 10 - t if t < 20 else (10 + t // 10) - t
    return groups[0] * 1000 + groups[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions: cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def partial_credit(response: str, answer: str) -> float:
    """1 − edit distance / the longer string's length, in [0, 1]: 1 for the exact answer, 0.8 for
    one slip in five digits, 0 for an empty or unrelated response. Surrounding space is ignored."""
    r, a = response.strip(), answer.strip()
    if not r and not a:
        return 1.0
    return 1.0 - edit_distance(r, a) / max(len(r), len(a))


def ranked_pair(n: int, policy: ErrorModel, rng: random.Random) -> tuple[str, str] | None:
    """(chosen, rejected): two of `policy`'s answers for `n`, the higher partial credit first; None
    when every resample of the second ties the first."""
    answer = str(n)
    a = policy.answer(n, rng)
    for _ in range(TIE_RETRIES):
        b = policy.answer(n, rng)
        ra, rb = partial_credit(a, answer), partial_credit(b, answer)
        if ra != rb:
            return (a, b) if ra > rb else (b, a)
    return None


def make_ranked_task(*, n_sft: int, n_pairs: int, n_eval: int, max_value: int, seed: int,
                     n_validation: int, demos: ErrorModel, samples: ErrorModel) -> dict[str, list[dict]]:
    """Deterministic SFT / preference / validation / eval rows. Prompts split as the numbers
    task's (held-out numbers never appear in training); SFT completions are `demos`' answers;
    preference pairs and the held-out sets' pairs are ranked pairs of `samples`' answers (held-out
    rows also carry the right `answer`; a held-out prompt whose samples always tie gets the right
    answer as chosen and a slip of it as rejected)."""
    rng = random.Random(seed)
    eval_numbers, validation_numbers, train_numbers = split_numbers(
        rng, n_eval=n_eval, n_validation=n_validation, max_value=max_value, n_sft=n_sft, task="numbers-ranked")
    sft = [{"prompt": prompt_for(n), "completion": demos.answer(n, rng)} for n in train_numbers[:n_sft]]
    pairs: list[dict] = []
    for k in range(20 * n_pairs):  # bounded: a policy that always ties cannot loop forever
        if len(pairs) == n_pairs:
            break
        n = train_numbers[k % len(train_numbers)]
        pair = ranked_pair(n, samples, rng)
        if pair is not None:
            pairs.append({"prompt": prompt_for(n), "chosen": pair[0], "rejected": pair[1]})

    def held(ns: list[int]) -> list[dict]:
        rows = []
        for n in ns:
            pair = ranked_pair(n, samples, rng) or (str(n), corrupt(str(n), rng))
            rows.append({"prompt": prompt_for(n), "answer": str(n), "chosen": pair[0], "rejected": pair[1]})
        return rows
    return {"sft": sft, "preferences": pairs, "eval": held(eval_numbers), "validation": held(validation_numbers)}
