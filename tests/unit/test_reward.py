"""Reward-model scoring, win rate and the DPO implicit reward, on tiny random Llama models."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast)

from distill_pipeline.data.tokenize import encode_prompt, encode_response
from distill_pipeline.models import ModelError, _tiny_tokenizer
from distill_pipeline.reward import (implicit_rewards, load_reward_model, reward_scores,
                                     win_rate)

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, bos_token_id=None)

PROMPTS = [[{"role": "user", "content": "digits: seven"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 3 and 4"}],
           [{"role": "user", "content": "12"}]]
RESPONSES = ["7", "the sum of three and four is seven", "twelve twelve"]


def _config(tok, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, **SIZE, **kw)


def _save_reward_dir(path, *, num_labels: int = 1, seed: int = 0):
    tok = _tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForSequenceClassification(_config(tok, num_labels=num_labels)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    return load_reward_model(str(_save_reward_dir(tmp_path_factory.mktemp("rm") / "rm")))


def test_load_reward_model(reward):
    model, tok = reward
    assert isinstance(model, LlamaForSequenceClassification) and not model.training
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert tok.chat_template and next(model.parameters()).dtype == torch.float32


def test_reward_scores_match_hand_computation(reward):
    model, tok = reward
    scores = reward_scores(model, tok, PROMPTS, RESPONSES, batch_size=3)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    for p, r, s in zip(PROMPTS, RESPONSES, scores):
        text = tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        assert text.endswith(f"<|assistant|>{r}<|end|>")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert s == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3  # different conversations, different scores


def test_reward_scores_do_not_depend_on_batching(reward):
    model, tok = reward
    lengths = [len(tok.apply_chat_template(p + [{"role": "assistant", "content": r}],
                                           tokenize=False)) for p, r in zip(PROMPTS, RESPONSES)]
    assert len(set(lengths)) == 3  # the batch really carries padding
    together = reward_scores(model, tok, PROMPTS, RESPONSES, batch_size=16)
    alone = [reward_scores(model, tok, [p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    pairs = reward_scores(model, tok, PROMPTS, RESPONSES, batch_size=2)
    assert together == pytest.approx(alone, abs=1e-5)
    assert pairs == pytest.approx(alone, abs=1e-5)
    assert reward_scores(model, tok, [], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward_scores(model, tok, PROMPTS[:2], RESPONSES[:1])


def test_win_rate():
    assert win_rate([1, 2, 3], [0, 2, 4]) == 0.5
    assert win_rate([1.0, 1.0], [0.0, 0.5]) == 1.0
    assert win_rate([0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -1.0]) == 0.5
    assert win_rate([-1.0], [2.0]) == 0.0
    with pytest.raises(ValueError, match="3 scores but 2 baseline"):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        win_rate([], [])


def _causal_lm(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(tok)).eval()


def _hand_logp(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    return sum(logp[len(prompt) + t - 1, y].item() for t, y in enumerate(response))


def test_implicit_rewards_match_hand_computation():
    tok = _tiny_tokenizer()
    policy, reference = _causal_lm(tok, 1), _causal_lm(tok, 2)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    responses = [encode_response(tok, r) for r in RESPONSES]
    got = implicit_rewards(policy, reference, prompts, responses, pad_id=tok.pad_token_id,
                           batch_size=2)
    expected = [_hand_logp(policy, p, r) - _hand_logp(reference, p, r)
                for p, r in zip(prompts, responses)]
    assert len(got) == 3 and all(isinstance(v, float) for v in got)
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(abs(v) > 1e-3 for v in got)  # different models really disagree
    same = implicit_rewards(policy, policy, prompts, responses, pad_id=tok.pad_token_id)
    assert same == [0.0, 0.0, 0.0]
    copy = _causal_lm(tok, 1)
    assert implicit_rewards(policy, copy, prompts, responses, pad_id=tok.pad_token_id) == [0.0] * 3


def test_load_refuses_num_labels_not_one(tmp_path):
    path = _save_reward_dir(tmp_path / "two", num_labels=2)
    with pytest.raises(ModelError, match=r"num_labels=2.*one scalar") as err:
        load_reward_model(str(path))
    assert str(path) in str(err.value)


def test_load_refuses_causal_lm_checkpoint(tmp_path):
    tok = _tiny_tokenizer()
    _causal_lm(tok, 0).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelError, match="num_labels=2"):  # a causal LM config defaults to 2
        load_reward_model(str(tmp_path / "lm"))
    config = json.loads((tmp_path / "lm/config.json").read_text())
    config["id2label"] = {"0": "LABEL_0"}  # claims one label, but has no score head
    (tmp_path / "lm/config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="score.weight.*not a trained reward model"):
        load_reward_model(str(tmp_path / "lm"))


def test_load_refuses_tokenizer_without_chat_template(tmp_path):
    path = tmp_path / "rm"
    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(_config(tok, num_labels=1)).save_pretrained(path)
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<|pad|>",
                                   eos_token="<|end|>", unk_token="<unk>")
    bare.save_pretrained(path)
    with pytest.raises(ModelError, match="no chat template") as err:
        load_reward_model(str(path))
    assert str(path) in str(err.value) and "chat_template.jinja" in str(err.value)


def test_load_refuses_missing_or_incomplete_dir(tmp_path):
    with pytest.raises(ModelError, match="cannot load reward model"):
        load_reward_model(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no model weights/config"):
        load_reward_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown dtype"):
        load_reward_model(str(tmp_path / "empty"), dtype="float33")
