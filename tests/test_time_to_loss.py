"""benchmarks/time_to_loss.py on the CPU with tiny settings: the corpus of Python files, the data
both systems read, the summary arithmetic, and a whole tinygpt piece (nanoGPT's too, when a
checkout is named by TINYGPT_NANOGPT)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_loss as ttl  # noqa: E402

from tinygpt.config import ModelConfig  # noqa: E402
from tinygpt.data.corpus import window_batches  # noqa: E402
from tinygpt.eval.ppl import window_loss  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "".join(f"{['ROMEO', 'JULIET'][i % 2]}:\nWhat light through yonder window {i % 7} breaks?\n\n"
               for i in range(200))
TINY = ["--device", "cpu", "--no-compile", "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32",
        "--set", "ctx=32", "--set", "batch=4", "--set", "steps=6", "--set", "eval_every=3", "--set", "warmup=1"]


def test_python_files_are_sorted_deduplicated_and_capped(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for rel, body in (("b/x.py", "x = 1\n"), ("a/y.py", "y = 2\n"), ("c/copy.py", "x = 1\n"), ("a/z.py", "z = 3\n"),
                      ("a/empty.py", "\n"), ("a/data.txt", "not python")):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(body)
    (site / "a" / "latin1.py").write_bytes(b"s = '\xe9'\n")
    monkeypatch.setattr(ttl.sysconfig, "get_paths", lambda: {"purelib": str(site), "platlib": str(site)})
    files = ttl.python_files(1.0)
    assert sorted(t for _, t in files) == ["x = 1\n", "y = 2\n", "z = 3\n"]          # one copy, UTF-8, .py only
    assert [d for d, _ in files] == sorted(d for d, _ in files)                       # in content-hash order
    assert len(ttl.python_files(5e-6)) == 1                                           # capped by size


def test_shakespeare_data_gives_both_systems_the_same_windows(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    data = ttl.shakespeare_data(tmp_path / "input.txt", tmp_path / "work")
    cut = int(len(TEXT) * 0.9)
    chars = sorted(set(TEXT))
    assert data["vocab"] == len(chars) and data["nano_val"].tolist() == [chars.index(c) for c in TEXT[cut:]]
    train = np.fromfile(data["nano_dir"] / "train.bin", dtype=np.uint16)
    assert "".join(chars[i] for i in train) == TEXT[:cut]
    assert Tokenizer.byte_level().decode(data["ours_val"].tolist()) == TEXT[cut:]     # the same text, byte ids


def test_the_clock_counts_only_running_time():
    clock = ttl.Clock("cpu")
    assert clock.pause() == 0.0
    clock.resume()
    x = sum(range(200000))
    ran = clock.pause()
    assert ran > 0 and clock.pause() == ran and x


def test_the_score_is_the_validation_function_and_the_summary_arithmetic():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=97)).eval()
    tokens = np.arange(500) % 97
    assert ttl.score(model, tokens, 32, 4, "cpu") == window_loss(model, window_batches(tokens, 32, 4))
    nano = {"system": "nanogpt", "label": "nanogpt", "command": "n", "points": [
        {"step": 250, "train_s": 10.0, "loss": 2.0}, {"step": 500, "train_s": 20.0, "loss": 1.5},
        {"step": 750, "train_s": 30.0, "loss": 1.6}]}
    ours = {"system": "tinygpt", "label": "tinygpt", "command": "t", "points": [
        {"step": 250, "train_s": 4.0, "loss": 1.8}, {"step": 500, "train_s": 8.0, "loss": 1.41},
        {"step": 750, "train_s": 12.0, "loss": 1.45}]}
    s = ttl.summarise("a", [nano, ours])
    e = s["runs"]["tinygpt"]
    assert e["best"]["loss"] == 1.41 and e["time_to"]["1.5"] == (8.0, 500) and e["time_to"]["1.42"] == (8.0, 500)
    assert e["at_nanogpt_times"] == [1.41, 1.41, 1.41] and s["runs"]["nanogpt"]["at_nanogpt_times"] == [2.0, 1.5, 1.5]
    assert e["time_to_nanogpt_best_ratio"] == 8.0 / 20.0 and e["target"] == {"best_le_1.42": True,
                                                                            "time_to_1.42_ratio": 0.4}
    assert "| tinygpt | 1.4100 (500, 8) |" in ttl.table("a", s)


def test_a_tinygpt_piece_and_the_report(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    common = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--shakespeare",
              str(tmp_path / "input.txt"), *TINY]
    ttl.main(["run", "--workload", "a", "--system", "tinygpt", *common])
    run = json.loads((tmp_path / "out" / "a-tinygpt.json").read_text())
    assert [p["step"] for p in run["points"]] == [3, 6] and "--keep-best" in run["command"]
    assert all(p["train_s"] > 0 and np.isfinite(p["loss"]) for p in run["points"])
    nanogpt = os.environ.get("TINYGPT_NANOGPT")
    if nanogpt:
        ttl.main(["run", "--workload", "a", "--system", "nanogpt", "--nanogpt", nanogpt, *common])
    result = ttl.report(tmp_path / "out")
    assert result["a"]["runs"]["tinygpt"]["best"]["loss"] == min(p["loss"] for p in run["points"])
    assert (tmp_path / "out" / "time_to_loss.md").read_text().startswith("### workload a")
    if nanogpt:
        assert [p["step"] for p in json.loads((tmp_path / "out" / "a-nanogpt.json").read_text())["points"]] == [3, 6]
        assert result["a"]["runs"]["tinygpt"]["at_nanogpt_times"]
