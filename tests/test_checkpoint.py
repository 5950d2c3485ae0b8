"""Checkpoints: atomic writes, weights_only loading, clear errors, RNG state round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import minisgm.checkpoint as ckpt
from minisgm.checkpoint import (
    CheckpointError,
    find_checkpoint,
    get_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
)


def _state():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"step": 7, "config": {"train": {"lr": 1e-3, "ch_mult": [1, 2]}, "model_class": "ModelConfig"},
            "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": get_rng_state({"data": torch.Generator().manual_seed(3)})}


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
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = get_rng_state({"data": gen})
    path = save_checkpoint({"step": 0, "config": {}, "model": {}, "rng": state}, tmp_path / "c.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen), np.random.randn())
    # Disturb everything, then restore from the weights_only-loaded file.
    torch.rand(10), np.random.rand(10), random.random(), torch.rand(4, generator=gen)
    set_rng_state(load_checkpoint(path)["rng"], {"data": gen})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen), np.random.randn())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3]) and first[4] == second[4]
