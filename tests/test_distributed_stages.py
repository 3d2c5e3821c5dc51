"""Every training stage under torchrun-style data parallelism (gloo, CPU): two ranks with half the
rows each give what one process gives at the same global batch (the artifact's tensors and the
logged losses, to float32 tolerance: only the order of the sums differs), and the resume state
saved by one world size continues on another along the same trajectory."""
import json

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks, torchrun
from test_stages import _base, _files, _teacher, ctrl_c_at
from tinygpt.cli import main
from tinygpt.io import load_tensors

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built"),
              pytest.mark.usefixtures("one_thread")]
GLOBAL_BATCH = 4


def _argv(stage: str, p) -> list[str]:
    """The stage's command line without --batch and --out (tiny data, 3 steps)."""
    corpus = ["--corpus", str(p / "corpus.txt"), "--preset", "nano", "--byte-tokenizer", "--ctx", "32",
              "--lr", "3e-3"]
    base = str(p / "base.tinygpt")
    argv = {
        "train": ["train", *corpus],
        "train-moe": ["train", *corpus, "--n-experts", "4", "--n-shared-experts", "1"],
        "sft": ["sft", base, "--data", str(p / "sft.jsonl"), "--lr", "1e-2"],
        "reward": ["reward", base, "--data", str(p / "prefs.jsonl"), "--lr", "1e-3", "--val-split", "0"],
        "dpo": ["dpo", base, "--data", str(p / "prefs.jsonl"), "--lr", "1e-2"],
        "orpo": ["orpo", base, "--data", str(p / "prefs.jsonl"), "--lr", "1e-2"],
        "kto": ["kto", base, "--data", str(p / "kto.jsonl"), "--lr", "1e-2"],
        "grpo": ["grpo", base, "--prompts", str(p / "sft.jsonl"), "--reward-fn", "format", "--group-size", "2",
                 "--max-new-tokens", "4", "--lr", "1e-2", "--minibatch", "4"],
        "ppo": ["ppo", base, "--prompts", str(p / "sft.jsonl"), "--reward-fn", "format", "--max-new-tokens", "4",
                "--minibatch", "2", "--lr", "1e-2", "--kl-target", "0.1"],
        "distill": ["distill", base, "--teacher", base, "--teacher-lora", str(p / "t.lora"), "--data",
                    str(p / "sft.jsonl"), "--lr", "1e-2", "--alpha", "0.5", "--lmbda", "0.5", "--max-new-tokens", "4"],
    }[stage]
    return argv + ["--steps", "3", "--seed", "3", "--device", "cpu", "--dtype", "float32", "--quiet"]


SUFFIX = {"train": ".tinygpt", "train-moe": ".tinygpt", "reward": ".tinygpt"}
FAST = ["train", "sft", "dpo", "grpo"]                    # in `make test`; the rest are marked slow
PER_MICRO_BATCH = {"train-moe"}
STAGES = FAST + ["train-moe", "reward", "orpo", "kto", "ppo", "distill"]


def _inputs(tmp_path):
    """The base model, the data files, the corpus and the distillation teacher's adapter."""
    model, _ = _base(tmp_path)
    _files(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"doc {i}: the cat sat on mat {i}." for i in range(40)))
    _teacher(tmp_path, model)


def _out(tmp_path, stage, tag):
    return tmp_path / f"{stage}-{tag}{SUFFIX.get(stage, '.lora')}"


def _losses(out) -> list[float]:
    run = out.with_name(out.stem + ".run")
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a, b, stage):
    ta, tb = load_tensors(a)[0], load_tensors(b)[0]
    assert ta.keys() == tb.keys(), stage
    for k in ta:   # Adam's first steps move each weight by about +-lr whatever its gradient's size, so a
        # gradient near 0 whose rounding differs moves by up to 2e-4 here; a wrong batch moves by ~1e-2
        torch.testing.assert_close(ta[k], tb[k], atol=3e-4, rtol=1e-3, msg=lambda m: f"{stage} {k}: {m}")
    assert _losses(a) == pytest.approx(_losses(b), abs=1e-5, rel=1e-5), stage


def _check_stages(stages, tmp_path, world=2):
    _inputs(tmp_path)
    per_rank = [_argv(s, tmp_path) + ["--batch", str(GLOBAL_BATCH // world), "--out", str(_out(tmp_path, s, "dp"))]
                for s in stages]
    assert run_ranks(world, per_rank, tmp_path) == [0] * len(stages)
    for s in stages:
        one = _out(tmp_path, s, "one")
        # a mixture of experts' balancing loss is a per-micro-batch term: its peer is --accum, not one batch
        split = ["--batch", str(GLOBAL_BATCH // world), "--accum", str(world)] if s in PER_MICRO_BATCH else \
            ["--batch", str(GLOBAL_BATCH)]
        assert main(_argv(s, tmp_path) + split + ["--out", str(one)]) == 0, s
        _assert_same(_out(tmp_path, s, "dp"), one, s)


def test_two_ranks_match_one_process_fast_stages(tmp_path):
    _check_stages(FAST, tmp_path)


@pytest.mark.slow
def test_two_ranks_match_one_process_other_stages(tmp_path):
    _check_stages([s for s in STAGES if s not in FAST], tmp_path)


@pytest.mark.slow
def test_four_ranks_match_one_process(tmp_path):
    _check_stages(["train", "dpo", "grpo"], tmp_path, world=4)


RESUMED = ["train", "sft", "dpo", "grpo"]


def _split(stage, world):
    """--batch/--accum of `world` ranks for the same global batch; with --resume on another world
    size the micro-batch stays and --accum x ranks stays (what the resume state checks)."""
    if stage in ("train", "grpo"):          # a global batch of rows, however it is split
        return ["--batch", str(GLOBAL_BATCH // world)]
    return ["--batch", "2", "--accum", str(GLOBAL_BATCH // 2 // world)]


def test_resume_across_world_sizes_continues_the_same_trajectory(tmp_path, monkeypatch):
    """Saved on 2 ranks and resumed on 1, and saved on 1 and resumed on 2: both equal one
    uninterrupted process, weights and logged losses."""
    _inputs(tmp_path)
    argv = {s: _argv(s, tmp_path) + ["--steps", "4", "--save-every", "1"] for s in RESUMED}
    for s in RESUMED:
        assert main(argv[s] + _split(s, 1) + ["--out", str(_out(tmp_path, s, "one"))]) == 0, s
    # 2 ranks, interrupted at step 2; and 1 process, interrupted at step 2
    assert run_ranks(2, [argv[s] + _split(s, 2) + ["--out", str(_out(tmp_path, s, "2to1"))] for s in RESUMED],
                     tmp_path, stop_at=2) == [130] * len(RESUMED)
    undo = ctrl_c_at(monkeypatch, 2)
    for s in RESUMED:
        assert main(argv[s] + _split(s, 1) + ["--out", str(_out(tmp_path, s, "1to2"))]) == 130, s
    undo()
    for s in RESUMED:
        assert main(argv[s] + _split(s, 1) + ["--out", str(_out(tmp_path, s, "2to1")), "--resume"]) == 0, s
    assert run_ranks(2, [argv[s] + _split(s, 2) + ["--out", str(_out(tmp_path, s, "1to2")), "--resume"]
                         for s in RESUMED], tmp_path) == [0] * len(RESUMED)
    for s in RESUMED:
        for tag in ("2to1", "1to2"):
            _assert_same(_out(tmp_path, s, tag), _out(tmp_path, s, "one"), f"{s} {tag}")


def test_fsdp_state_saved_on_two_ranks_resumes_on_one(tmp_path):
    """--fsdp (FSDP2 shards, sharded AdamW state) on 2 ranks, interrupted at step 2: its resume
    state (gathered to full tensors) continues on one process to what one process trains."""
    _inputs(tmp_path)
    argv = _argv("train", tmp_path) + ["--steps", "4", "--save-every", "1"]
    one, resumed = _out(tmp_path, "train", "one"), _out(tmp_path, "train", "fsdp")
    assert run_ranks(2, [argv + ["--batch", "2", "--fsdp", "--out", str(resumed)]], tmp_path, stop_at=2) == [130]
    assert load_tensors(resumed)[1]["training_step"] == "2"          # the interrupted artifact: whole weights
    assert main(argv + ["--batch", "4", "--out", str(resumed), "--resume"]) == 0
    assert main(argv + ["--batch", "4", "--out", str(one)]) == 0
    _assert_same(resumed, one, "fsdp resumed")


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process(tmp_path):
    _inputs(tmp_path)
    argv = _argv("train", tmp_path)
    assert run_ranks(2, [argv + ["--batch", "2", "--fsdp", "--out", str(_out(tmp_path, "train", "fsdp"))]],
                     tmp_path) == [0]
    assert main(argv + ["--batch", "4", "--out", str(_out(tmp_path, "train", "one"))]) == 0
    _assert_same(_out(tmp_path, "train", "fsdp"), _out(tmp_path, "train", "one"), "fsdp")


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 -m tinygpt.cli train ...`, the command users type."""
    _inputs(tmp_path)
    dp, one = _out(tmp_path, "train", "torchrun"), _out(tmp_path, "train", "one")
    done = torchrun(2, _argv("train", tmp_path) + ["--batch", "2", "--out", str(dp)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("step 3: loss") == 1                  # one summary line, from rank 0
    assert main(_argv("train", tmp_path) + ["--batch", "4", "--out", str(one)]) == 0
    _assert_same(dp, one, "torchrun")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "orpo", "reward", "distill"])
def test_fsdp_two_ranks_match_one_process_in_the_post_training_stages(stage, tmp_path):
    """Adapters, reward models and the preference stages' wrapped policy are written whole from
    the shards (`parallel.full_weights` gives every module its full state dict). Distillation
    off-policy only (--lmbda 0): on-policy batches are refused with --fsdp."""
    _inputs(tmp_path)
    argv = _argv(stage, tmp_path)
    if stage == "distill":
        argv[argv.index("--lmbda") + 1] = "0"
    assert run_ranks(2, [argv + ["--batch", "2", "--fsdp", "--out", str(_out(tmp_path, stage, "fsdp"))]],
                     tmp_path) == [0]
    assert main(argv + ["--batch", "4", "--out", str(_out(tmp_path, stage, "one"))]) == 0
    _assert_same(_out(tmp_path, stage, "fsdp"), _out(tmp_path, stage, "one"), stage)


@pytest.mark.parametrize("stage", ["grpo", "ppo", "distill"])
def test_fsdp_is_refused_where_generation_runs_outside_the_sharded_model(stage, tmp_path, capsys):
    _inputs(tmp_path)
    assert main(_argv(stage, tmp_path) + ["--fsdp", "--out", str(tmp_path / "x.lora")]) == 2
    err = capsys.readouterr().err
    assert "--fsdp is not available for this run" in err and "Traceback" not in err
    assert not (tmp_path / "x.run").exists()

