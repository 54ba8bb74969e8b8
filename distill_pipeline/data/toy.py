"""The built-in toy task: number words → digits (the ADPA paper's own case study, scaled down).

`make_task(...)` returns three deterministic row lists in the layouts the readers accept:
an SFT set (`prompt`/`completion`), preference pairs (`prompt`/`chosen`/`rejected`, chosen
correct, rejected plausibly wrong) and a held-out eval set (`prompt`/`answer`/`chosen`/`rejected`).
Eval numbers never appear in the SFT or preference sets.

The SFT data carries a systematic bias for preference alignment to fix: for numbers ≥ 100 that
contain a zero digit (the words never say "zero"), a share `noise` of completions drop the
zeros ("four thousand seven" → "47"). SFT models learn the bias; the preference pairs reject
it; a DPO teacher unlearns it, and a student can inherit that only through the teacher.
"""
from __future__ import annotations

import random

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
INSTRUCTION = "digits:"


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000, e.g. 4207 → 'four thousand two hundred seven'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words supports 0..999999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    rest = n % 1000
    return number_to_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_to_words(rest))


def prompt_for(n: int) -> str:
    return f"{INSTRUCTION} {number_to_words(n)}"


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit off by one, two neighbours swapped, a digit dropped
    or doubled. Never equal to `answer`."""
    for _ in range(20):
        digits = list(answer)
        kind = rng.choice(["off_by_one", "swap", "drop", "double"])
        i = rng.randrange(len(digits))
        if kind == "off_by_one":
            digits[i] = str((int(digits[i]) + rng.choice([1, 9])) % 10)
        elif kind == "swap" and len(digits) > 1:
            j = min(i + 1, len(digits) - 1) if i + 1 < len(digits) else i - 1
            digits[i], digits[j] = digits[j], digits[i]
        elif kind == "drop" and len(digits) > 1:
            del digits[i]
        else:
            digits.insert(i, digits[i])
        wrong = "".join(digits)
        if wrong != answer and not (len(wrong) > 1 and wrong[0] == "0"):
            return wrong
    return str(int(answer) + 1)


def has_silent_zero(n: int) -> bool:
    return n >= 100 and "0" in str(n)


def drop_zeros(answer: str) -> str:
    return answer.replace("0", "")


def split_numbers(rng: random.Random, *, n_eval: int, n_validation: int, max_value: int, n_sft: int,
                  task: str = "numbers") -> tuple[list[int], list[int], list[int]]:
    """(eval, validation, train) numbers: 0..max_value shuffled by `rng`, disjoint; the SFT set is
    the first `n_sft` train numbers, preference pairs cycle through all of them."""
    held_out = n_eval + n_validation
    if n_sft + held_out > max_value + 1:
        raise ValueError(f"{task} task: n_sft + n_eval + n_validation = {n_sft + held_out} exceeds "
                         f"the {max_value + 1} distinct numbers 0..{max_value}; raise max_value")
    numbers = list(range(max_value + 1))
    rng.shuffle(numbers)
    return numbers[:n_eval], numbers[n_eval:held_out], numbers[held_out:]


def make_task(*, n_sft: int, n_pairs: int, n_eval: int, max_value: int, noise: float,
              seed: int, n_validation: int = 100) -> dict[str, list[dict]]:
    """Deterministic SFT / preference / validation / eval rows for the numbers task."""
    rng = random.Random(seed)
    eval_numbers, validation_numbers, train_numbers = split_numbers(
        rng, n_eval=n_eval, n_validation=n_validation, max_value=max_value, n_sft=n_sft)
    sft_numbers = train_numbers[:n_sft]
    sft = []
    for n in sft_numbers:
        answer = str(n)
        biased = has_silent_zero(n) and rng.random() < noise
        sft.append({"prompt": prompt_for(n), "completion": drop_zeros(answer) if biased else answer})

    def rejected(n: int) -> str:
        return drop_zeros(str(n)) if has_silent_zero(n) else corrupt(str(n), rng)

    pairs = []
    for k in range(n_pairs):
        n = train_numbers[k % len(train_numbers)]
        pairs.append({"prompt": prompt_for(n), "chosen": str(n), "rejected": rejected(n)})
    def held(ns: list[int]) -> list[dict]:
        return [{"prompt": prompt_for(n), "answer": str(n), "chosen": str(n), "rejected": rejected(n)}
                for n in ns]
    evaluation = held(eval_numbers)
    validation = held(validation_numbers)
    return {"sft": sft, "preferences": pairs, "eval": evaluation, "validation": validation}


def corpus(max_value: int = 99_999) -> list[str]:
    """Every string the task can produce; the tiny tokenizer is trained on it."""
    words = {w for n in range(0, max_value + 1, 7) for w in number_to_words(n).split()}
    words |= set(ONES) | set(TENS[2:]) | {"hundred", "thousand"}
    lines = [INSTRUCTION + " " + " ".join(sorted(words))]
    lines += [str(n) for n in range(0, 1000)]
    lines += [prompt_for(n) for n in range(0, max_value + 1, 97)]
    return lines
