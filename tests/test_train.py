"""The training loop: run folder, data order, exact resume after SIGKILL, DDP equivalence, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import TINY_DIGITS, run_module
from minisgm.checkpoint import load_checkpoint
from minisgm.config import config_from_dict, config_to_dict, get_preset
from minisgm.build import TrainingData as Data
from minisgm.build import _mix, build_data
from minisgm.train import ema_update, lr_at, main, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- units ----------------------------------------------------------------------------------
def test_lr_warmup_is_linear_then_constant():
    tc = get_preset("digits_vp").train
    tc.lr, tc.warmup = 2e-4, 5000
    assert lr_at(1, tc) == pytest.approx(2e-4 / 5000)
    assert lr_at(2500, tc) == pytest.approx(1e-4)
    assert lr_at(5000, tc) == lr_at(10**6, tc) == 2e-4
    tc.warmup = 0
    assert lr_at(1, tc) == 2e-4


def test_ema_matches_the_closed_form():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    theta, theta0 = [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in ema.parameters()]
    rate, k = 0.9, 7
    for _ in range(k):
        ema_update(ema, model, rate)
    # theta_ema_k = theta + rate^k (theta_ema_0 - theta) for constant theta
    for pe, p, p0 in zip(ema.parameters(), theta, theta0):
        assert torch.allclose(pe, p + rate**k * (p0 - p), atol=1e-6)


def test_seed_mixing_does_not_collide():
    seeds = {_mix(s, step, shard) for s in range(3) for step in range(200) for shard in range(8)}
    assert len(seeds) == 3 * 200 * 8 and all(0 <= v < 2**63 for v in seeds)


def test_data_order_is_a_function_of_seed_and_step():
    cfg = get_preset("digits_vp")
    data = build_data(cfg, torch.device("cpu"))
    n, b = len(data), 128
    steps = -(-n // b) + 1
    order = torch.cat([data.indices(s, b) for s in range(steps)])
    # Epoch 0 is a permutation of the data set, and epoch 1 starts a fresh one.
    assert torch.equal(order[:n].sort().values, torch.arange(n))
    assert not torch.equal(order[n : n + b], order[:b])
    # A fresh object (a resumed process) gives the same order; another seed does not.
    again = Data(cfg.data, cfg.train.seed, torch.device("cpu"))
    assert torch.equal(again.indices(steps - 1, b), data.indices(steps - 1, b))
    other = Data(cfg.data, cfg.train.seed + 1, torch.device("cpu"))
    assert not torch.equal(other.indices(0, b), data.indices(0, b))


def test_shards_partition_the_global_batch():
    cfg = get_preset("digits_cond")
    data = build_data(cfg, torch.device("cpu"))
    g = torch.Generator()
    full_x, full_y = data.batch(3, 0, 1, 64, g)
    parts = [data.batch(3, k, 4, 64, g) for k in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    assert full_x.shape == (64, 1, 8, 8) and full_x.min() >= -1 and full_x.max() <= 1  # centred scale


def test_toy_preset_trains_in_process_and_draws_a_scatter(tmp_path):
    cfg = get_preset("toy_moons")
    cfg.train.n_steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = 30, 64, 10, 30
    cfg.sample.n_steps, cfg.sample.n_samples, cfg.train.sample_every = 10, 100, 30
    run = train(cfg, tmp_path / "toy", progress=False)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert (run / "samples" / "step-00000030.png").read_bytes()[:8] == PNG_MAGIC
    assert load_checkpoint(run)["step"] == 30


# ----- the command line -------------------------------------------------------------------------
def test_default_entry_point_writes_the_run_folder(tiny_digits_run):
    run = tiny_digits_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "digits_vp" and cfg["train"]["n_steps"] == 4 and cfg["model"]["nf"] == 8
    assert cfg["sde"]["kind"] == "vp" and cfg["data"]["dataset"] == "digits" and cfg["model"]["arch"] == "unet"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "images_per_s"}
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["images_per_s"] > 0
    assert lines[-1]["lr"] == pytest.approx(2e-3 * 4 / 100)  # warm-up of the preset
    assert (run / "samples" / "step-00000004.png").read_bytes()[:8] == PNG_MAGIC
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and config_from_dict(state["config"]) == config_from_dict(cfg)
    assert set(state) >= {"model", "ema", "optimizer", "rng", "config", "step"}
    assert set(state["rng"]) == {"torch", "cuda"}  # dropout's generator; everything else is re-seeded
    history = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "finished"] and history[-1]["step"] == 4
    # The EMA moved away from the initial weights but lags the raw weights.
    assert not _same_tensors(state["model"], state["ema"])


def _kill_args(run_dir):
    return ["--run-dir", str(run_dir), "--model.nf", "8", "--model.embed_dim", "16", "--train.batch_size", "16",
            "--train.n_steps", "40", "--train.ckpt_every", "5", "--train.log_every", "10", "--train.sample_every", "0",
            "--model.dropout", "0.1", "--no-progress"]


def test_killed_run_resumes_bit_exactly(tmp_path):
    """SIGKILL right after the first checkpoint, resume, compare with an uninterrupted run."""
    ref = run_module("minisgm.train", *_kill_args(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "minisgm.train", *_kill_args(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(killed)["step"]
    assert 5 <= at_kill < 40, at_kill

    res = run_module("minisgm.train", *_kill_args(killed))  # the folder has a checkpoint: resume
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"from step {at_kill}" in res.stdout
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(killed)
    assert a["step"] == b["step"] == 40
    for key in ("model", "ema"):
        assert _same_tensors(a[key], b[key]), key
    for i, s in a["optimizer"]["state"].items():
        assert _same_tensors(s, b["optimizer"]["state"][i])
    # The logged losses agree too (lines past the resumed checkpoint were rewritten, not duplicated).
    la = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la] == [10, 20, 30, 40]
    # (a line whose interval straddles the kill averages fewer steps, so compare the others)
    for ra, rb in zip(la, lb):
        if ra["step"] - 10 >= at_kill:
            assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]


def test_two_gloo_ranks_match_one_process_with_grad_accum(tmp_path):
    """torchrun with 2 CPU ranks == 1 process with grad_accum=2 (same global batch and noise)."""
    common = ["--model.nf", "8", "--model.embed_dim", "16", "--train.batch_size", "16", "--train.n_steps", "6",
              "--train.log_every", "3", "--train.ckpt_every", "6", "--train.sample_every", "0", "--no-progress"]
    one = run_module("minisgm.train", "--run-dir", str(tmp_path / "one"), "--train.grad_accum", "2", *common)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_module("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minisgm.train",
                     "--run-dir", str(tmp_path / "two"), *common)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=1e-5, atol=1e-6), (key, k)
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    before = load_checkpoint(run)
    code = main(["--resume", str(run), "--train.n_steps", "10", "--train.lr", "1e30", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "NaN/inf" in err and "Last good checkpoint" in err and "(step 4)" in err
    after = load_checkpoint(run)
    assert after["step"] == before["step"] == 4
    assert _same_tensors(after["model"], before["model"])
    # config.json still describes the checkpoint: a plain --resume does not inherit lr = 1e30.
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 2e-3
    assert main(["--resume", str(run), "--train.n_steps", "6", "--no-progress"]) == 0
    events = [json.loads(l)["event"] for l in (run / "history.jsonl").read_text().splitlines()]
    assert events[-4:] == ["resume", "diverged", "resume", "finished"]


def test_corrupt_or_mismatched_checkpoint_stops_with_a_message(tiny_digits_run, tmp_path, capsys):
    from minisgm.checkpoint import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    # Weights of another architecture under this run's config: refused when loaded.
    state = load_checkpoint(run)
    state["config"]["model"]["nf"] = 16
    save_checkpoint(state, tmp_path / "other" / "checkpoint.pt")
    (tmp_path / "other" / "config.json").write_text(json.dumps(state["config"]))
    assert main(["--resume", str(tmp_path / "other"), "--train.n_steps", "6", "--no-progress"]) == 3
    assert "do not fit this model" in capsys.readouterr().err
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    assert main(["--resume", str(run), "--train.n_steps", "6", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "checkpoint.prev.pt" in err  # the previous one is named


def test_flipped_bytes_are_caught_by_the_digest(tiny_digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    weights = max(load_checkpoint(run)["model"].values(), key=lambda t: t.numel())
    at = bytes(data).find(weights.numpy().tobytes()[:32])  # inside a tensor's stored bytes
    assert at > 0
    data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
    (run / "checkpoint.pt").write_bytes(bytes(data))
    assert main(["--resume", str(run), "--train.n_steps", "6", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "SHA-256 digest" in err and "checkpoint.prev.pt" in err
    prev = load_checkpoint(run / "checkpoint.prev.pt")  # the previous checkpoint is intact
    assert prev["step"] == 2


def test_resume_refuses_changes_that_make_the_checkpoint_meaningless(tiny_digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    for args, needle in [(["--sde.kind", "ve"], "sde.kind: 'vp' -> 've'"), (["--model.nf", "16"], "model.nf: 8 -> 16"),
                         (["--data.centered", "false"], "data.centered"), (["--train.seed", "3"], "train.seed")]:
        assert main(["--run-dir", str(run), *args, "--no-progress"]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(run), "--preset", "digits_ve"])
    assert e.value.code == 2 and "cannot change it" in capsys.readouterr().err
    assert load_checkpoint(run)["step"] == 4  # nothing was trained


def test_a_second_process_on_a_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "minisgm.train", *_kill_args(run)[2:], "--run-dir", str(run),
                              "--train.n_steps", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 180
        while not (run / "history.jsonl").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_module("minisgm.train", *_kill_args(run), "--train.seed", "8", timeout=120)
        assert second.returncode == 2, second.stderr
        assert "in use by pid" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # The crashed (killed) first run leaves no stuck lock: the folder can be used again.
    again = run_module("minisgm.train", *_kill_args(run), "--train.n_steps", "5", timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_the_run_resumes_bit_exactly(tmp_path, sig):
    """SIGTERM/SIGINT: a checkpoint at the next step boundary (ckpt_every is far away), then exit."""
    args = ["--train.ckpt_every", "1000"]
    ref = run_module("minisgm.train", *_kill_args(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "minisgm.train", *_kill_args(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists():  # the first log line (step 10)
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err and "Traceback" not in err
    at_stop = load_checkpoint(run)["step"]
    assert 10 <= at_stop < 40
    history = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1] == {**history[-1], "event": "stopped", "signal": signal.Signals(sig).name, "step": at_stop}
    res = run_module("minisgm.train", "--resume", str(run), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(run)
    assert a["step"] == b["step"] == 40
    for key in ("model", "ema"):
        assert _same_tensors(a[key], b[key]), key


def test_stale_temporary_files_are_removed(tiny_digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_digits_run, run)
    (run / ".checkpoint.pt.tmp-999999").write_bytes(b"half a checkpoint")
    assert main(["--resume", str(run), "--train.n_steps", "5", "--no-progress"]) == 0
    assert not (run / ".checkpoint.pt.tmp-999999").exists()
    assert "left by a process killed while writing" in capsys.readouterr().out


def test_bad_runs_end_in_one_clear_line(tiny_digits_run, tmp_path, capsys, monkeypatch, busy_machine):
    import errno

    import minisgm.checkpoint as ckpt_mod

    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--run-dir", str(tmp_path / "a_file")], 2, "is a file"),
        (["--preset", "cifar10_small", "--run-dir", str(tmp_path / "c")], 2, "cannot load data.dataset=cifar10"),
        (["--data.dataset", "folder", "--data.path", str(tmp_path / "none"), "--run-dir", str(tmp_path / "f")], 2,
         "image folder not found"),
    ]
    for args, code, needle in cases:
        assert main([*args, "--no-progress"]) == code, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_digits_run, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(broken)])
    assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    for no, needle in [(errno.ENOSPC, "no space left"), (errno.EROFS, "Read-only file system")]:
        def failing_save(*a, _no=no, **k):
            raise OSError(_no, os.strerror(_no)) if _no != errno.ENOSPC else OSError(_no, "no space left on the disk")
        monkeypatch.setattr(ckpt_mod, "save_checkpoint", failing_save)
        monkeypatch.setattr("minisgm.train.save_checkpoint", failing_save)
        run = tmp_path / f"fs{no}"
        shutil.copytree(tiny_digits_run, run)
        assert main(["--resume", str(run), "--train.n_steps", "6", "--no-progress"]) == 4
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        monkeypatch.undo()


def test_cifar10_small_preset_runs_on_a_small_archive(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    run = tmp_path / "cifar"
    res = run_module(
        "minisgm.train", "--preset", "cifar10_small", "--run-dir", str(run), "--data.path", str(path),
        "--model.nf", "16", "--model.ch_mult", "1,2", "--model.num_res_blocks", "1",
        "--train.batch_size", "4", "--train.n_steps", "2", "--train.log_every", "1", "--train.ckpt_every", "2",
        "--train.mixed_precision", "--train.channels_last", "--sample.n_steps", "2", "--sample.n_samples", "4",
        "--no-progress", timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model_class"] == "NCSNppConfig" and cfg["sde"]["kind"] == "ve" and cfg["model"]["nf"] == 16
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(r["loss"] > 0 for r in lines)
    assert (run / "samples" / "step-00000002.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "checkpoint-00000002.pt").is_file()  # the CIFAR presets keep snapshots
    assert load_checkpoint(run)["step"] == 2


def test_stopping_early_and_resuming_in_process_is_exact(tmp_path):
    def cfg():
        c = get_preset("toy_moons")
        c.train.n_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every, c.train.sample_every = 12, 32, 4, 4, 0
        return c

    full = train(cfg(), tmp_path / "full", progress=False)
    part = cfg()
    part.train.max_steps_per_run = 5  # e.g. a time-limited cluster job: stops cleanly at step 5
    train(part, tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part")["step"] == 5
    train(cfg(), tmp_path / "part", progress=False)  # next job: picks the checkpoint up
    a, b = load_checkpoint(full), load_checkpoint(tmp_path / "part")
    assert b["step"] == 12 and _same_tensors(a["model"], b["model"]) and _same_tensors(a["ema"], b["ema"])


def _numerics():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_train_leaves_the_process_numerics_as_it_found_them(tmp_path, monkeypatch):
    """Found on an H200: after ``train()`` in the same process, TF32 matrix products stayed on and a
    later colorization missed its exact grey constraint (tolerance 1e-5). ``backend_flags`` restores
    them."""
    from minisgm.train import backend_flags

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _numerics()
    assert before[0] is False and before[3] is False and before[5] is None
    with backend_flags(False, "cuda"):  # what a CUDA run sets (the flags exist on CPU builds too)
        assert _numerics()[1:5] == (True, True, True, "high")
    assert _numerics() == before
    with backend_flags(True, "cpu"):
        assert _numerics()[0] is True and _numerics()[5] == ":4096:8"
    assert _numerics() == before
    cfg = get_preset("toy_moons")
    cfg.train.n_steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = 3, 16, 3, 3
    cfg.train.sample_every, cfg.train.deterministic = 0, True
    train(cfg, tmp_path / "det", progress=False)
    assert _numerics() == before
    with pytest.raises(RuntimeError, match="inside"), backend_flags(True, "cpu"):
        raise RuntimeError("inside")  # restored on errors too
    assert _numerics() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fast_path_bf16_channels_last_fused_adam_compile(tmp_path):
    cfg = get_preset("digits_vp")
    cfg.train.n_steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.sample_every = 20, 10, 10, 20
    cfg.train.mixed_precision = cfg.train.channels_last = cfg.train.compile = True
    cfg.sample.n_steps = 10
    run = train(cfg, tmp_path / "gpu", progress=False)
    state = load_checkpoint(run)
    assert state["step"] == 20 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_digits_hold_out_the_test_split():
    from minisgm.data import load_digits
    from minisgm.digit_features import digits_split

    cfg = get_preset("digits_vp")
    data = build_data(cfg, torch.device("cpu"))
    train_idx, test_idx = digits_split()
    assert len(data) == len(train_idx) == 1797 - len(test_idx)
    levels, _ = load_digits(return_int=True)
    assert torch.equal(data.images.long(), levels[train_idx])
    cfg.data.holdout = False
    assert len(build_data(cfg, torch.device("cpu"))) == 1797
