"""The fault suite: kills, full and read-only disks, bad values and crafted files, against the real
command line. Every fault must end one of two ways: the run resumes to exactly what an
uninterrupted run gives, or the command stops with one line `tinygpt: error: ...` (exit 2) and
leaves the files it found as they were.

- Kills (subprocesses, `tests/fault_child.py`): SIGKILL forced inside the checkpoint window (a
  torn state write, a state renamed into place before the artifact, ...) and at random moments;
  `--resume` must then give the uninterrupted run's weights bit for bit, metrics.jsonl one row per
  step, and no temp file left. Two forced windows run in `make test`; every window and the
  random trials for train, SFT, DPO and GRPO are `slow` (`make test-slow`; FAULT_TRIALS sets the
  number of random kills per stage, default 3; FAULT_REPORT=FILE appends what each kill left on
  disk, one JSON line per trial, for docs/reliability.md).
- Disks: a small tmpfs filled to its last byte, and one remounted read-only (only where the tests
  run as root and may mount; skipped otherwise, and a folder without write permission stands
  in for the read-only one).
- Values and files: the concrete cases found by hand (every numeric option's range is covered by
  tests/test_options.py), and crafted .tinygpt / .lora / state files, each refused by loading and
  by `tinygpt verify`.
- Guards: a run whose every step is skipped, weights that become non-finite, Ctrl-C marking.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_child import fill_disk, mount_tmpfs
from safetensors.torch import save as st_save
from test_stages import STAGES, _base, _files, ctrl_c_at

from tinygpt.cli import main
from tinygpt.io import load_tensors, tensors_checksum

pytestmark = pytest.mark.usefixtures("one_thread")
CHILD = Path(__file__).with_name("fault_child.py")
COMMON = ["--steps", "6", "--seed", "3", "--device", "cpu", "--dtype", "float32", "--quiet", "--save-every", "1"]
SUFFIX = {"train": ".tinygpt"}
KILL_STAGES = ("train", "sft", "dpo", "grpo")


@pytest.fixture
def world(tmp_path):
    _base(tmp_path)
    _files(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"doc {i}: the cat sat on mat {i}." for i in range(40)))
    return tmp_path


def one_line_error(capsys, code, *needles) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if not x.startswith("tinygpt: warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tinygpt: error: "), (code, err)
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- kills ---------------------------------------------------------------------------------------
def _argv(stage, world, out):
    return STAGES[stage](world) + COMMON + ["--out", str(out)]


def _child(argv, kill=None, timeout=300):
    cmd = [sys.executable, str(CHILD)] + (["--kill", kill] if kill else []) + ["--", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def _outcome(out):
    """(tensors of the artifact, [(step, loss)] of metrics.jsonl)."""
    rows = [json.loads(x) for x in (out.with_suffix(".run") / "metrics.jsonl").read_text().splitlines()]
    return load_tensors(out)[0], [(r["step"], r["loss"]) for r in rows]


def _leftovers(world) -> list[Path]:
    return [p for p in world.rglob("*.tmp")]


def _left_by_kill(out, state) -> dict:
    """What a kill left: the state's round, metrics rows past it, temp files, the artifact's step."""
    saved = json.loads(load_tensors(state)[1]["state"])["round"] if state.exists() else None
    metrics = out.with_suffix(".run") / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if metrics.exists() else []
    ahead = sum(1 for x in rows if x.strip().startswith("{") and x.strip().endswith("}")
                and json.loads(x)["step"] > (saved or 0))
    return {"state_round": saved, "metrics_rows_ahead": ahead, "torn_metrics_line": bool(rows) and not
            rows[-1].rstrip().endswith("}"), "temp_files": len([p for p in out.parent.rglob("*.tmp")]),
            "artifact_step": int(load_tensors(out)[1].get("training_step", -1)) if out.exists() else None}


def _resume_and_compare(stage, world, out, ref, kill="random"):
    """After a kill: what is on disk loads, --resume (or a fresh start when no state was saved)
    finishes the run, and it equals the reference bit for bit, with no temp file left."""
    state = out.with_suffix(".run") / "state.safetensors"
    for f in (out, state):
        if f.exists():
            load_tensors(f)                                   # whole and checksum-correct
    if os.environ.get("FAULT_REPORT"):
        with open(os.environ["FAULT_REPORT"], "a") as fh:
            fh.write(json.dumps({"stage": stage, "kill": kill, **_left_by_kill(out, state)}) + "\n")
    done = _child(_argv(stage, world, out) + (["--resume"] if state.exists() else []))
    assert done.returncode == 0, done.stderr[-2000:]
    got, want = _outcome(out), ref
    assert got[0].keys() == want[0].keys() and all(torch.equal(got[0][k], want[0][k]) for k in want[0]), stage
    assert got[1] == want[1], (stage, got[1], want[1])        # one row per step, the same losses
    assert _leftovers(world) == []


def _start(stage, world, out, wait_for_training: bool) -> tuple[subprocess.Popen, float]:
    """Start a child run; returns it (once its run folder exists, when `wait_for_training`) and
    the wall time then (time.time, the clock of file modification times)."""
    proc = subprocess.Popen([sys.executable, str(CHILD), "--", *map(str, _argv(stage, world, out))],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while wait_for_training and not out.with_suffix(".run").exists() and proc.poll() is None:
        time.sleep(0.005)
    return proc, time.time()


def _reference(stage, world, in_process: bool):
    """The uninterrupted run's outcome (in this process, or a child: then with the seconds from
    its start, and from its run folder appearing, to its last write)."""
    out = world / f"ref{SUFFIX.get(stage, '.lora')}"
    if in_process:
        assert main(_argv(stage, world, out)) == 0
        return _outcome(out)
    proc, t0 = _start(stage, world, out, wait_for_training=False)
    while not out.with_suffix(".run").exists() and proc.poll() is None:
        time.sleep(0.005)
    t_run = time.time()
    assert proc.wait() == 0
    end = out.stat().st_mtime                              # the final artifact's write
    return _outcome(out), (end - t0, end - t_run)


WINDOWS = ["mid-write:state.safetensors:3", "before-rename:state.safetensors:3", "after-rename:state.safetensors:3",
           "mid-write:OUT:2", "before-rename:OUT:2"]


@pytest.mark.parametrize("stage,window", [("train", WINDOWS[0]), ("sft", WINDOWS[2])])
def test_a_kill_inside_the_checkpoint_window_resumes_exactly(world, stage, window):
    """A torn state write (the temp file half written) and a state renamed into place before the
    artifact was rewritten: both resume to the uninterrupted run."""
    ref = _reference(stage, world, in_process=True)
    out = world / f"k{SUFFIX.get(stage, '.lora')}"
    killed = _child(_argv(stage, world, out), kill=window.replace("OUT", out.name))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _resume_and_compare(stage, world, out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("stage", KILL_STAGES)
def test_every_checkpoint_window_and_random_kills_resume_exactly(world, stage):
    """Every forced window, then FAULT_TRIALS kills at random moments: uniform over the whole run
    (start-up and set-up included) for even trials, over its training for odd ones, as long as the
    uninterrupted run took to write its final artifact."""
    ref, spans = _reference(stage, world, in_process=False)
    ext = SUFFIX.get(stage, ".lora")
    for i, window in enumerate(WINDOWS):
        out = world / f"w{i}{ext}"
        killed = _child(_argv(stage, world, out), kill=window.replace("OUT", out.name))
        assert killed.returncode == -signal.SIGKILL, (window, killed.stderr[-2000:])
        _resume_and_compare(stage, world, out, ref, window)
    rng = random.Random(f"kills/{stage}")
    for i in range(int(os.environ.get("FAULT_TRIALS", "3"))):
        out = world / f"r{i}{ext}"
        training = i % 2 == 1
        proc, t0 = _start(stage, world, out, wait_for_training=training)
        span = spans[training]
        at = rng.uniform(0, span)
        time.sleep(max(0.0, t0 + at - time.time()))
        proc.send_signal(signal.SIGKILL)
        finished = proc.wait() == 0
        _resume_and_compare(stage, world, out, ref, f"random {at:.2f} s of {span:.2f} s of "
                            f"{'training' if training else 'the whole run'}" + " (finished first)" * finished)


def test_a_damaged_resume_state_is_refused_not_resumed(world, capsys):
    out = world / "m.tinygpt"
    argv = _argv("train", world, out)
    assert main(argv) == 0
    state = world / "m.run" / "state.safetensors"
    before = state.read_bytes()
    for offset in (len(before) - 7, 600):          # a weight byte; a byte of the header's JSON
        raw = bytearray(before)
        raw[offset] ^= 0x01
        state.write_bytes(bytes(raw))
        msg = one_line_error(capsys, main(argv + ["--resume"]), "--resume")
        assert "checksum" in msg or "not a valid safetensors" in msg or "not one this tinygpt wrote" in msg
    state.write_bytes(before)
    assert main(argv + ["--resume"]) == 0


# ---- disks ---------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs holding `old.tinygpt`, an older model file (skipped when it cannot be mounted)."""
    mnt = tmp_path / "disk"
    if not mount_tmpfs(mnt, 1024):
        pytest.skip("needs root and tmpfs to mount a small disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _llama(world) -> Path:
    """A nano model of the llama block family (the one `export` writes to GGUF)."""
    from tinygpt.checkpoint import save_model
    from tinygpt.config import ARCHS, ModelConfig, pad_vocab
    from tinygpt.model import GPT
    from tinygpt.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    save_model(world / "llama.tinygpt", GPT(ModelConfig.from_name("nano", **ARCHS["llama"],
                                                                  vocab_size=pad_vocab(tok.vocab_size))), tok)
    return world / "llama.tinygpt"


def _writers(world, dest: Path) -> dict:
    """Commands that write, each aimed at `dest` (a folder on the faulty disk)."""
    base, sft = world / "base.tinygpt", world / "s.lora"
    return {
        "train": [*STAGES["train"](world), "--steps", "1", "--device", "cpu", "--quiet", "--out", dest / "old.tinygpt"],
        "sft": [*STAGES["sft"](world), "--steps", "1", "--device", "cpu", "--quiet", "--full", "--out",
                dest / "old.tinygpt"],
        "dpo": [*STAGES["dpo"](world), "--steps", "1", "--device", "cpu", "--quiet", "--full", "--out",
                dest / "old.tinygpt"],
        "merge": ["merge", base, "--lora", sft, "--out", dest / "old.tinygpt"],
        "quantize": ["quantize", base, "--int8", "--out", dest / "old.tinygpt"],
        "export": ["export", _llama(world), "--format", "gguf", "--out", dest / "old.gguf"],
        "eval": ["eval", base, "--tasks", "synth", "--data", world / "eval.jsonl", "--device", "cpu", "--quiet",
                 "--max-new-tokens", "2", "--out", dest / "old.json"],
        "tokenizer train": ["tokenizer", "train", "--corpus", world / "corpus.txt", "--vocab-size", "300", "--out",
                            dest / "old.json"],
        "data synth": ["data", "synth", "--scale", "0.05", "--out", dest / "world"],
    }


def _old_files(dest: Path) -> dict:
    for name in ("old.tinygpt", "old.gguf", "old.json"):
        (dest / name).write_bytes(f"previous {name}".encode() * 8)
    (dest / "world").mkdir(exist_ok=True)
    return {p: p.read_bytes() for p in dest.iterdir() if p.is_file()}


def _adapter_for(world):
    assert main([*STAGES["sft"](world), "--steps", "1", "--device", "cpu", "--quiet", "--out", str(world / "s.lora")]) == 0


def test_a_full_disk_is_a_one_line_error_and_the_previous_files_stay(world, small_disk, capsys):
    _adapter_for(world)
    old = _old_files(small_disk)
    fill_disk(small_disk)
    for name, argv in _writers(world, small_disk).items():
        code = main([str(a) for a in argv])
        one_line_error(capsys, code, "cannot write", "the disk is full")
        assert all(p.read_bytes() == b for p, b in old.items()), name
        assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")], name


def test_a_read_only_folder_is_refused_before_any_work(world, tmp_path, capsys):
    _adapter_for(world)
    ro = tmp_path / "ro"
    mounted = mount_tmpfs(ro, 1024)
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("needs tmpfs to make a read-only folder as root")
        ro.mkdir()
    old = _old_files(ro)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.chmod(0o555)
    try:
        for name, argv in _writers(world, ro).items():
            t0 = time.perf_counter()
            one_line_error(capsys, main([str(a) for a in argv]), "cannot be written")
            assert time.perf_counter() - t0 < 30, name              # before the work, not after it
            assert all(p.read_bytes() == b for p, b in old.items()), name
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        else:
            ro.chmod(0o755)


def test_out_under_a_file_or_beside_a_run_folder_that_is_a_file(world, capsys):
    _adapter_for(world)
    (world / "plain").write_text("x")
    for argv in (["merge", world / "base.tinygpt", "--lora", world / "s.lora", "--out", world / "plain" / "m.tinygpt"],
                 ["data", "synth", "--out", world / "plain"],
                 [*STAGES["train"](world), "--steps", "1", "--out", world / "plain" / "m.tinygpt"]):
        one_line_error(capsys, main([str(a) for a in argv]))
    (world / "m.run").write_text("a file where the run folder goes")
    one_line_error(capsys, main([str(a) for a in [*STAGES["train"](world), "--out", world / "m.tinygpt"]]),
                   "run folder")


# ---- values found by hand ------------------------------------------------------------------------
HAND_CASES = [
    ("train", ["--warmup", "-5"], "--warmup"), ("train", ["--grad-clip", "-1"], "--grad-clip"),
    ("train", ["--weight-decay", "-1"], "--weight-decay"), ("train", ["--min-lr", "-1"], "--min-lr"),
    ("train", ["--lr", "inf"], "--lr"), ("train", ["--ctx", "1000", "--block-size", "512"], "--block-size"),
    ("train", ["--tokenizer", "t.json"], "--byte-tokenizer"), ("train", ["--seed", "-1"], "--seed"),
    ("train", ["--block-size", "1000000000"], "--block-size"), ("train", ["--depth", "100000"], "--depth"),
    ("dpo", ["--beta", "-1"], "--beta"), ("dpo", ["--beta", "0"], "--beta"), ("kto", ["--beta", "0"], "--beta"),
    ("orpo", ["--beta", "-1"], "--lambda"), ("grpo", ["--temperature", "-1"], "--temperature"),
    ("grpo", ["--top-p", "0"], "--top-p"), ("grpo", ["--top-k", "-1"], "--top-k"),
    ("sft", ["--lora-rank", "10000000"], "--lora-rank"), ("sft", ["--lora-weight", "nan"], "--lora-weight"),
    ("sft", ["--truncate", "right"], "--truncate"), ("sft", ["--max-length", "1"], "--max-length"),
    ("sft", ["--lora-rank", "1000"], "exceeds the smallest side (64)"),
]
PPO = [(["--gamma", "-1"], "--gamma"), (["--lam", "2"], "--lam"), (["--vf-coef", "-1"], "--vf-coef")]


@pytest.mark.parametrize("stage,flags,needle", HAND_CASES + [("ppo", f, n) for f, n in PPO],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else str(x))
def test_bad_values_are_one_line_errors_before_any_work(world, capsys, stage, flags, needle):
    argv = STAGES[stage](world)
    t0 = time.perf_counter()
    one_line_error(capsys, main([str(a) for a in [*argv, *flags, "--out", world / "x.lora"]]), needle)
    assert time.perf_counter() - t0 < 5 and not (world / "x.lora").exists()


@pytest.mark.parametrize("argv,needle", [
    (["sample", "{base}", "--temperature", "nan"], "--temperature"),
    (["sample", "{base}", "--top-p", "1.5"], "--top-p"),
    (["chat", "{base}", "--temperature", "-0.1"], "--temperature"),
    (["chat", "{base}", "--top-k", "-2"], "--top-k"),
    (["eval", "{base}", "--tasks", "ppl", "--data", "{corpus}", "--stride", "-1"], "--stride"),
    (["eval", "{base}", "--tasks", "ppl", "--data", "{corpus}", "--seed", "-3"], "--seed"),
    (["data", "synth", "--scale", "1e9", "--out", "{tmp}/w"], "--scale"),
    (["tokenizer", "train", "--corpus", "{corpus}", "--vocab-size", "100000000", "--out", "{tmp}/t.json"],
     "--vocab-size"),
])
def test_sampling_and_other_values_are_checked_in_every_command(world, capsys, argv, needle):
    fill = {"base": world / "base.tinygpt", "corpus": world / "corpus.txt", "tmp": world}
    one_line_error(capsys, main([a.format(**fill) for a in argv]), needle)


# ---- crafted files -------------------------------------------------------------------------------
def _craft(path, tensors, meta, checksum=True):
    """A safetensors file with exactly these tensors and metadata (checksum made to match, so the
    structural checks, not the checksum, are what must refuse it)."""
    meta = dict(meta)
    meta.pop("checksum", None)
    if checksum:
        meta["checksum"] = tensors_checksum(tensors, meta)
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def _model_cases(world):
    sd, meta = load_tensors(world / "base.tinygpt")
    cfg = json.loads(meta["config"])
    with_cfg = lambda **kw: {**meta, "config": json.dumps({**cfg, **kw})}   # noqa: E731
    emb = "model.embed_tokens.weight"
    return {
        "config not JSON": (sd, {**meta, "config": "{n_layer: 2"}, "not valid JSON"),
        "config missing": (sd, {k: v for k, v in meta.items() if k != "config"}, "lacks its config"),
        "config field mistyped": (sd, with_cfg(n_embd="64"), "n_embd must be int"),
        "n_layer 100000": (sd, with_cfg(n_layer=100000), "n_layer is 100000"),
        "block_size 1e9": (sd, with_cfg(block_size=10**9), "block_size is 1000000000"),
        "n_layer mismatching the tensors": (sd, with_cfg(n_layer=3), "n_layer is 3"),
        "a wrong shape": ({**sd, emb: sd[emb][:-1]}, meta, "embedding"),
        "int64 weights": ({**sd, "lm_head.weight": sd["lm_head.weight"].long()}, meta, "not a floating-point"),
        "a missing tensor": ({k: v for k, v in sd.items() if k != "model.norm.weight"}, meta, "missing"),
        "NaN weights": ({**sd, emb: sd[emb].clone().fill_(float("nan"))}, meta, "NaN or infinite"),
        "inf weights": ({**sd, "lm_head.weight": sd["lm_head.weight"] * float("inf")}, meta, "NaN or infinite"),
        "tokenizer garbage": (sd, {**meta, "tokenizer": "{]"}, "tokenizer cannot be read"),
        "not a tinygpt file": (sd, {"format": "pt"}, "not a tinygpt model"),
    }


def test_crafted_model_files_are_refused_by_loading_and_by_verify(world, capsys):
    for name, (sd, meta, needle) in _model_cases(world).items():
        path = _craft(world / "bad.tinygpt", sd, meta)
        t0 = time.perf_counter()
        one_line_error(capsys, main(["sample", str(path), "--max-new-tokens", "2", "--device", "cpu"]), needle)
        one_line_error(capsys, main(["verify", str(path)]), needle)
        assert time.perf_counter() - t0 < 10, name                  # refused before anything big is built
    sd, meta = load_tensors(world / "base.tinygpt")
    raw = bytearray((world / "base.tinygpt").read_bytes())
    raw[-5] ^= 0x10                                                  # a flipped data byte
    (world / "flip.tinygpt").write_bytes(bytes(raw))
    for cmd in (["sample", str(world / "flip.tinygpt"), "--device", "cpu"], ["verify", str(world / "flip.tinygpt")]):
        one_line_error(capsys, main(cmd), "checksum")
    (world / "cut.tinygpt").write_bytes(bytes(raw[: len(raw) // 2]))  # a truncated file
    one_line_error(capsys, main(["verify", str(world / "cut.tinygpt")]), "not a valid safetensors")


def test_nonfinite_weights_load_only_when_allowed_and_old_files_without_checksum_load(world, capsys):
    sd, meta = load_tensors(world / "base.tinygpt")
    bad = _craft(world / "nan.tinygpt", {**sd, "lm_head.weight": sd["lm_head.weight"] * float("nan")}, meta)
    assert main(["sample", str(bad), "--max-new-tokens", "2", "--device", "cpu", "--allow-nonfinite"]) == 0
    assert main(["verify", str(bad), "--allow-nonfinite"]) == 0
    assert "1 tensor(s) hold NaN" in capsys.readouterr().out
    old = _craft(world / "old.tinygpt", sd, meta, checksum=False)      # written before checksums existed
    assert main(["sample", str(old), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert main(["verify", str(old)]) == 0 and "no checksum" in capsys.readouterr().out


def test_crafted_adapters_are_refused(world, capsys):
    _adapter_for(world)
    sd, meta = load_tensors(world / "s.lora")
    a = next(k for k in sd if k.endswith(".lora_A"))
    cases = {
        "rank not matching its tensors": (sd, {**meta, "rank": "8"}, "rank 8 does not match"),
        "rank 1e7": (sd, {**meta, "rank": "10000000"}, "rank 10000000 does not match"),
        "targets matching nothing": ({k.replace("layers.0", "layers.9"): v for k, v in sd.items()}, meta,
                                     "does not have"),
        "targets not naming its layers": (sd, {**meta, "targets": json.dumps(["nothing"])}, "do not name"),
        "no LoRA layers": ({k: v for k, v in sd.items() if "lora_" not in k}, meta, "no LoRA layers"),
        "alpha not a number": (sd, {**meta, "alpha": '"big"'}, "alpha"),
        "NaN values": ({**sd, a: sd[a] * float("nan")}, meta, "NaN or infinite"),
        "metadata incomplete": (sd, {k: v for k, v in meta.items() if k != "rank"}, "incomplete"),
    }
    base = str(world / "base.tinygpt")
    for name, (tensors, m, needle) in cases.items():
        path = _craft(world / "bad.lora", tensors, m)
        t0 = time.perf_counter()
        one_line_error(capsys, main(["sample", base, "--lora", str(path), "--max-new-tokens", "2", "--device", "cpu"]),
                       needle)
        assert time.perf_counter() - t0 < 10, name
        if name != "targets matching nothing":        # which layers exist depends on the base
            one_line_error(capsys, main(["verify", str(path)]), needle)


# ---- guards: last good, not last finite ----------------------------------------------------------
def _function_stage(tmp_path, loss_fn, steps=3, **kw):
    from tinygpt.train.stage import FunctionStage, TrainOptions
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opts = TrainOptions(out=str(tmp_path / "f.out"), steps=steps, device="cpu", quiet=True, **kw)
    saved = []
    stage = FunctionStage(model, lambda m, b: (loss_fn(m, b), 1, {}), lambda i: torch.ones(2, 4), opts,
                          save=lambda final: saved.append(final))
    return stage, model, saved


def test_a_run_with_no_good_step_fails_and_saves_nothing(tmp_path):
    from tinygpt.errors import UserError
    stage, _, saved = _function_stage(tmp_path, lambda m, b: m(b).sum() * float("nan"), steps=3)
    with pytest.raises(UserError, match="no good step: all 3 steps had a non-finite loss"):
        stage.train()
    assert saved == [] and not (tmp_path / "f.run" / "state.safetensors").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    from tinygpt.errors import UserError
    calls = []

    def loss(m, b):
        out = m(b).sum()                         # finite: the step counts as good
        calls.append(1)
        if len(calls) == 3:                      # what a broken update leaves in the weights
            with torch.no_grad():
                m.weight[0, 0] = float("inf")
        return out
    stage, model, saved = _function_stage(tmp_path, loss, steps=5, save_every=1)
    with pytest.raises(UserError, match="weights became non-finite by step 3"):
        stage.train()
    assert saved == [False, False]               # the checkpoints of steps 1 and 2, not step 3's
    state = load_tensors(tmp_path / "f.run" / "state.safetensors")[0]
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("param."))
    assert not torch.isfinite(model.weight).all()


def test_ctrl_c_saves_under_out_marked_interrupted_and_loading_says_so(world, capsys, monkeypatch):
    undo = ctrl_c_at(monkeypatch, 2)
    out = world / "m.tinygpt"
    argv = [str(a) for a in _argv("train", world, out)]
    argv.remove("--quiet")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"saved {out} marked as interrupted at step 2" in err
    meta = load_tensors(out)[1]
    assert (meta["training_status"], meta["training_step"], meta["training_steps"]) == ("interrupted", "2", "6")
    assert main(["sample", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert f"tinygpt: warning: {out} was saved at step 2 of 6 (training was interrupted)" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 0 and "(interrupted)" in capsys.readouterr().out
    undo()
    assert main(argv + ["--resume"]) == 0
    assert load_tensors(out)[1]["training_status"] == "complete"


def test_ctrl_c_before_any_good_step_saves_the_state_but_no_model(world, monkeypatch, capsys):
    ctrl_c_at(monkeypatch, 0)
    out = world / "m.tinygpt"
    argv = [str(a) for a in _argv("train", world, out)]
    argv.remove("--quiet")
    assert main(argv) == 130
    assert "before any good step: the resume state is saved, no model file" in capsys.readouterr().err
    assert not out.exists() and (world / "m.run" / "state.safetensors").exists()
