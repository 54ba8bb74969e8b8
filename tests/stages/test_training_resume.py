"""A training stage killed after a checkpoint resumes to the same weights as an uninterrupted run."""
from __future__ import annotations

import torch

from distill_pipeline.config import TrainHP
from distill_pipeline.training import train_loop


class Stop(Exception):
    pass


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(5)]

    def batches(epoch):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        return (data[i] for i in order)

    def loss_fn(m, batch, norm):
        x, y = batch
        loss = ((m(x) - y) ** 2).mean() / norm["micro_batches"]
        return loss, {"mse": loss}
    return model, batches, loss_fn


def counts(epoch):
    return [{"micro_batches": 1}] * 5


def test_resume_matches_uninterrupted(tmp_path):
    hp = TrainHP(lr=0.05, max_steps=9, batch_size=3, grad_accum=2, checkpoint_every=3)
    model, batches, loss_fn = _setup()
    train_loop(model, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn, work_dir=tmp_path / "a", desc="a")

    crashed, batches, loss_fn = _setup()

    def crash(step):
        if step == 6:
            raise Stop()
    (tmp_path / "b").mkdir()
    try:
        train_loop(crashed, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn,
                   work_dir=tmp_path / "b", desc="b", on_checkpoint=crash)
    except Stop:
        pass
    with open(tmp_path / "b/metrics.jsonl", "a") as fh:  # a step logged after the checkpoint, then kill -9
        fh.write('{"step": 7, "loss": 123.0}\n')
    resumed, batches, loss_fn = _setup(seed=123)  # fresh weights: must come from the checkpoint
    train_loop(resumed, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn, work_dir=tmp_path / "b", desc="b")
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # each step once: the crashed run's step 7 was dropped
    assert (tmp_path / "a/metrics.jsonl").read_text() == (tmp_path / "b/metrics.jsonl").read_text()


def test_resume_at_the_final_step_reports_the_logged_final_loss(tmp_path):
    """Killed after the final checkpoint (before the model was saved): the rerun resumes at the
    last step, trains nothing, and reports the final loss the log holds (not NaN)."""
    hp = TrainHP(lr=0.05, max_steps=6, batch_size=3, grad_accum=1, checkpoint_every=3)
    model, batches, loss_fn = _setup()
    clean = train_loop(model, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn,
                       work_dir=tmp_path / "a", desc="a")

    crashed, batches, loss_fn = _setup()

    def crash(step):
        if step == 6:
            raise Stop()
    try:
        train_loop(crashed, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn,
                   work_dir=tmp_path / "b", desc="b", on_checkpoint=crash)
    except Stop:
        pass
    resumed, batches, loss_fn = _setup(seed=123)
    summary = train_loop(resumed, hp=hp, examples=15, batches=batches, counts=counts, loss_fn=loss_fn,
                         work_dir=tmp_path / "b", desc="b")
    assert summary["steps"] == 6
    assert summary["final_loss"] == clean["final_loss"]  # a number, the last logged step's
