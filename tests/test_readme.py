"""The README's command-line block works when pasted into a shell after the two set-up commands.

The block after the marker ``<!-- tested by tests/test_readme.py -->`` is run line by line with
bash, in a fresh folder whose ``.venv`` is this test's virtual environment (so its first line,
``source .venv/bin/activate``, is run as written). Each command gets options appended that
make it tiny (a few steps, a small model): options given later win, so the command's own
options are all exercised. ``my_images`` is a small folder of PNG files in two classes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- tested by tests/test_readme.py -->"

TINY = {
    "train": ["--train.n_steps", "3", "--train.batch_size", "8", "--train.log_every", "1", "--train.ckpt_every", "3",
              "--train.sample_every", "0", "--no-progress"],
    "train_unet": ["--model.nf", "8", "--model.embed_dim", "16"],
    "train_ncsnpp": ["--model.nf", "16", "--model.ch_mult", "1,2", "--model.num_res_blocks", "1",
                     "--train.mixed_precision", "false", "--train.batch_size", "4"],
    "sample": ["--n", "4", "--steps", "3", "--no-progress"],
    "evaluate": ["--n", "8", "--steps", "3", "--no-progress"],
}


def readme_commands():
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "the README lost its tested block"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    block = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def tiny(command: str) -> str:
    m = re.match(r"python -m minisgm\.(\w+)", command)
    if m is None or "--help-config" in command:
        return command
    tool = m.group(1)
    extra = list(TINY.get(tool, []))
    if tool == "train" and "--resume" not in command:
        extra += TINY["train_ncsnpp" if "cifar10" in command else "train_unet"]
    return f"{command} {' '.join(extra)}"


def test_the_readme_block_is_the_one_tested():
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate"
    tools = {re.match(r"python -m minisgm\.(\w+)", c).group(1) for c in commands[1:]}
    assert tools == {"train", "sample", "evaluate"}


@pytest.mark.skipif(sys.platform == "win32", reason="bash")
def test_readme_commands_work_as_written(tmp_path):
    from PIL import Image

    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    assert (tmp_path / ".venv" / "bin" / "activate").is_file(), "the tests must run in a virtual environment"
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "my_images" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    script = "set -e\n" + "\n".join(tiny(c) for c in readme_commands()) + "\n"
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (script, res.stdout[-2000:], res.stderr[-3000:])
    assert "--train.lr" in res.stdout  # --help-config printed the options
    for folder in ("runs/vp", "runs/ve", "runs/mine"):
        assert (tmp_path / folder / "checkpoint.pt").is_file(), folder
    assert (tmp_path / "ve.npz").is_file() and (tmp_path / "ve.png").is_file()
    assert "digits Frechet distance" in res.stdout
