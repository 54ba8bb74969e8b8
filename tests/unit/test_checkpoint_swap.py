"""A checkpoint is swapped in by renames (checkpoint.swap_in); a crash at any point leaves a state
`training.recover` resolves to the newest complete checkpoint, and the next save works."""
from __future__ import annotations

import shutil

import pytest

from distill_pipeline.checkpoint import recover, swap_in


def _ckpt(path, step):
    path.mkdir(parents=True)
    (path / "loop.json").write_text(str(step))
    return path


@pytest.fixture
def names(tmp_path):
    ckpt = tmp_path / "checkpoint"
    return ckpt, ckpt.with_name("checkpoint.tmp"), ckpt.with_name("checkpoint.old")


def test_a_crash_between_the_two_renames_keeps_the_new_checkpoint(names):
    ckpt, tmp, old = names
    _ckpt(old, 1), _ckpt(tmp, 2)  # ckpt → old done, tmp → ckpt not yet
    assert recover(ckpt, "loop.json") and (ckpt / "loop.json").read_text() == "2"
    assert not tmp.exists() and not old.exists()


def test_a_crash_while_deleting_the_old_one_does_not_block_the_next_save(names):
    ckpt, tmp, old = names
    _ckpt(ckpt, 2), _ckpt(old, 1)  # swapped; `.old` half deleted
    (old / "shard").write_text("x")
    assert recover(ckpt, "loop.json") and (ckpt / "loop.json").read_text() == "2"
    _ckpt(old, 1)  # even without a recover in between, the next swap succeeds
    swap_in(_ckpt(tmp, 3), ckpt)
    assert (ckpt / "loop.json").read_text() == "3" and not old.exists() and not tmp.exists()


def test_an_unfinished_first_checkpoint_is_dropped(names):
    ckpt, tmp, old = names
    tmp.mkdir()  # written partly, never swapped in: nothing to resume
    assert not recover(ckpt, "loop.json") and not tmp.exists()
    _ckpt(ckpt, 4)
    assert recover(ckpt, "loop.json")  # the normal case: untouched
    shutil.rmtree(ckpt)
