"""Checkpoints: atomic writes, weights_only loading, clear errors, RNG state round trips."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import minisgm.checkpoint as ckpt
from minisgm.checkpoint import (
    CheckpointError,
    RunFolderBusy,
    find_checkpoint,
    get_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    lock_run_folder,
    previous_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    set_rng_state,
)


def _state():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"step": 7, "config": {"train": {"lr": 1e-3, "ch_mult": [1, 2]}, "model_class": "ModelConfig"},
            "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": get_rng_state()}


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "run" / "checkpoint.pt")
    # What load_checkpoint does, spelled out: a weights_only load must accept the file.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "minisgm-checkpoint" and raw["step"] == 7
    back = load_checkpoint(tmp_path / "run")  # a run folder works as well as the file
    assert back["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "config": {}, "model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "config": {}, "model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "truncated.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a minisgm checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty_dir")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "minisgm-checkpoint", "version": 1, "step": 0, "config": {}, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")


def test_mismatched_weights_name_the_keys():
    small, big = nn.Linear(3, 2), nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \[4, 3\] vs model \[2, 3\]"):
        load_state_dict_checked(small, big.state_dict())
    with pytest.raises(CheckpointError, match="1 missing"):
        load_state_dict_checked(small, {"weight": small.weight.detach()})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_state_dict_checked(small, {**small.state_dict(), "extra": torch.ones(1)})
    other = nn.Linear(3, 2)
    load_state_dict_checked(other, small.state_dict())
    assert torch.equal(other.weight, small.weight)


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    state = get_rng_state()
    path = save_checkpoint({"step": 0, "config": {}, "model": {}, "rng": state}, tmp_path / "c.pt")
    first = torch.rand(3)
    torch.rand(10)  # disturb, then restore from the weights_only-loaded file
    set_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(first, torch.rand(3))


def test_each_write_keeps_the_previous_checkpoint_and_a_digest(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "config": {}, "model": {"w": torch.ones(2)}}, path)
    assert not previous_checkpoint(path).exists()
    save_checkpoint({"step": 2, "config": {}, "model": {"w": torch.zeros(2)}}, path)
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous_checkpoint(path))["step"] == 1
    assert len(torch.load(path, weights_only=True)["sha256"]) == 64
    # A kill between the two renames leaves only the previous file: a run folder falls back to it.
    os.remove(path)
    assert load_checkpoint(tmp_path)["step"] == 1


def test_changed_content_fails_the_digest(tmp_path):
    path = save_checkpoint({"step": 3, "config": {}, "model": {"w": torch.arange(64.0)}}, tmp_path / "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["w"][10] += 1e-3  # what a flipped bit does, with an intact zip container
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not match its SHA-256 digest"):
        load_checkpoint(path)


def test_full_disk_is_named_and_the_old_file_kept(tmp_path, monkeypatch):
    import errno

    path = save_checkpoint({"step": 1, "config": {}, "model": {"w": torch.ones(2)}}, tmp_path / "checkpoint.pt")

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match="no space left on the disk"):
        save_checkpoint({"step": 2, "config": {}, "model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_stale_temporaries_and_the_folder_lock(tmp_path):
    (tmp_path / ".checkpoint.pt.tmp-12345").write_bytes(b"x")
    mine = tmp_path / f".checkpoint.pt.tmp-{os.getpid()}"
    mine.write_bytes(b"y")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".checkpoint.pt.tmp-12345"]
    assert mine.exists()
    lock = lock_run_folder(tmp_path)
    # flock is per open file: a second open file of this process is refused like another process.
    with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()}"):
        lock_run_folder(tmp_path)
    lock.close()
    lock_run_folder(tmp_path).close()  # released


def test_weights_of_another_dtype_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="another dtype"):
        load_state_dict_checked(model, {k: v.to(torch.int64) for k, v in model.state_dict().items()})
