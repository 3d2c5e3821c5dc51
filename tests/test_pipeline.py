"""Pipeline: wiring, resumability after a failed stage, and the report built from the results."""
import json
import re
from pathlib import Path

import pytest

from tinygpt import pipeline, report
from tinygpt.cli import main
from tinygpt.errors import UserError
from tinygpt.options import to_argv
from test_stages import ctrl_c_at

STAGES = """
name: t
defaults: {{quiet: true, device: cpu, seed: 0}}
stages:
  - {{name: data, cmd: data synth, out: data, args: {{scale: 0.05}}}}
  - {{name: tokenizer, cmd: tokenizer train, args: {{corpus: "${{data}}/corpus.txt", vocab-size: 300}}}}
  - name: base
    cmd: train
    args: {{corpus: "${{data}}/{corpus}", tokenizer: "${{tokenizer}}", preset: nano, steps: 2, batch: 2, ctx: 32}}
  - name: eval-base
    cmd: eval
    model: "${{base}}"
    args: {{tasks: "synth,ppl", data: ["synth=${{data}}/eval.jsonl", "ppl=${{data}}/corpus.txt"], limit: 4,
            label: base, max-new-tokens: 4}}
"""


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_failed_stage_stops_the_run_and_a_rerun_skips_finished_stages(tmp_path, capsys):
    run = tmp_path / "run"
    bad = write(tmp_path, STAGES.format(corpus="missing.txt"), "bad.yaml")
    assert main(["pipeline", str(bad), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error: stage 'base' failed: corpus file not found") and err.count("\n") == 1
    state = json.loads((run / "pipeline.json").read_text())
    assert {k: v["status"] for k, v in state["stages"].items()} == {"data": "done", "tokenizer": "done",
                                                                     "base": "failed"}
    assert "corpus file not found" in state["stages"]["base"]["error"]
    assert not (run / "base.tinygpt").exists()
    before = {k: state["stages"][k]["finished"] for k in ("data", "tokenizer")}
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "data" / "corpus.txt", run / "tokenizer.json")}

    good = write(tmp_path, STAGES.format(corpus="corpus.txt"), "good.yaml")
    lines = []
    res = pipeline.run_and_report(good, run, log=lines.append)
    assert [ln for ln in lines if "skipped" in ln] == ["[1/4] data: up to date, skipped",
                                                       "[2/4] tokenizer: up to date, skipped"]
    state = res["state"]
    assert all(state["stages"][k]["status"] == "done" for k in ("data", "tokenizer", "base", "eval-base"))
    assert {k: state["stages"][k]["finished"] for k in ("data", "tokenizer")} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert state["stages"]["base"]["started"] > before["tokenizer"]

    # a third run has nothing to do
    lines.clear()
    pipeline.run_pipeline(good, run, log=lines.append)
    assert sum("skipped" in ln for ln in lines) == 4

    # the report's table holds exactly the numbers of the results file
    results = json.loads((run / "eval-base.json").read_text())
    md = (run / "report.md").read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| model"))
    row = next(ln for ln in md.splitlines() if ln.startswith("| base"))
    cols = [c.strip() for c in head.strip("|").split("|")][1:]
    vals = [c.strip().strip("*") for c in row.strip("|").split("|")][1:]
    assert "synth/accuracy" in cols and "ppl/bpb" in cols and len(cols) == len(vals)
    for c, v in zip(cols, vals):
        task, metric = c.split("/", 1)
        assert float(v) == pytest.approx(results["tasks"][task][metric], abs=1e-4)
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<td>base</td>" in html
    assert (run / "report" / "base.png").stat().st_size > 1000
    # stage, command, status, seconds, steps, tokens seen, tokens/s, final loss, result, hardware
    assert re.search(r"\| base \| train \| done \| [\d.]+ \| 2 \| [\d.]+k? \| [\d.]+k? \| [\d.]+ \| - \| CPU", md), md
    assert (run / "report" / "evaluation.png").stat().st_size > 1000 and "![evaluation](report/evaluation.png)" in md

    # `tinygpt report` rebuilds it
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()


def test_changed_input_reruns_downstream_only(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one")
    k1 = pipeline.stage_key(["train", "--corpus", str(a)], tmp_path / "o")
    a.write_text("two")
    pipeline._HASHES.clear()
    assert pipeline.stage_key(["train", "--corpus", str(a)], tmp_path / "o") != k1
    # the stage's own output never enters its key
    out = tmp_path / "o.json"
    k2 = pipeline.stage_key(["eval", "--out", str(out)], out)
    out.write_text("{}")
    assert pipeline.stage_key(["eval", "--out", str(out)], out) == k2


def test_argv_building(tmp_path):
    cfg = write(tmp_path, """
defaults: {quiet: true, device: cpu}
stages:
  - {name: tok, cmd: tokenizer train, args: {corpus: [a.txt, b.txt], vocab-size: 512}}
  - {name: ev, cmd: eval, model: "${tok}", out: "${run}/x.json",
     args: {lora: [l1.lora, l2.lora], tasks: synth, data: d.jsonl, quiet: false}}
""")
    pipe = pipeline.load_pipeline(cfg)
    run = tmp_path / "run"
    outs = {}
    for st in pipe.stages:
        outs[st.name] = pipeline.stage_out(st, run, outs)
    cmd, tok = pipeline.stage_options(pipe.stages[0], pipe, run, outs)
    assert (tok.corpus, tok.vocab_size, tok.out) == (["a.txt", "b.txt"], 512, str(run / "tok.json"))
    assert to_argv(tok) == ["--corpus", "a.txt", "b.txt", "--vocab-size", "512", "--out", str(run / "tok.json")]
    cmd, ev = pipeline.stage_options(pipe.stages[1], pipe, run, outs)   # defaults only where the command has them
    assert (ev.model, ev.lora, ev.tasks, ev.data, ev.out, ev.device, ev.quiet) == (
        str(run / "tok.json"), ["l1.lora", "l2.lora"], "synth", ["d.jsonl"], str(run / "x.json"), "cpu", False)
    assert to_argv(ev) == [str(run / "tok.json"), "--device", "cpu", "--lora", "l1.lora", "--lora", "l2.lora",
                           "--tasks", "synth", "--data", "d.jsonl", "--out", str(run / "x.json")]


@pytest.mark.parametrize("text,msg", [
    ("stages:\n  - {name: a, cmd: nosuch}\n", "unknown command 'nosuch'"),
    ("stages:\n  - {name: a, cmd: eval, model: '${b}'}\n  - {name: b, cmd: eval}\n", "not an earlier stage"),
    ("stages:\n  - {name: a, cmd: eval}\n  - {name: a, cmd: eval}\n", "repeated stage name"),
    ("stages: []\n", "non-empty 'stages'"),
    ("stages:\n  - {name: a, cmd: eval, flags: {}}\n", "unknown stage key 'flags'"),
])
def test_bad_configs_fail_before_running(tmp_path, text, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        pipeline.load_pipeline(write(tmp_path, text))


def test_unknown_flag_names_the_stage(tmp_path):
    cfg = write(tmp_path, "stages:\n  - {name: d, cmd: data synth, args: {nope: 1}}\n")
    with pytest.raises(UserError, match=r"unknown option 'nope', .*p.yaml \(stage d\)"):
        pipeline.run_pipeline(cfg, tmp_path / "r")


@pytest.mark.parametrize("name", ["demo", "demo-rl", "distill"])
def test_presets_are_valid(name, tmp_path):
    from tinygpt.cli import parse_args
    pipe = pipeline.load_pipeline(pipeline.preset_path(name))
    assert [s.cmd for s in pipe.stages][:3] == ["data synth", "tokenizer train", "train"]
    outs = {}
    for st in pipe.stages:   # every stage's options exist and its values check; its command line parses the same
        outs[st.name] = pipeline.stage_out(st, tmp_path, outs)
        cmd, opts = pipeline.stage_options(st, pipe, tmp_path, outs)
        assert parse_args(st.cmd.split() + to_argv(opts))[1] == opts


def test_eval_table_marks_the_best_per_column():
    evals = [{"label": "base", "model": {"path": "b"}, "tasks": {"synth": {"accuracy": 0.1, "n": 9},
                                                                   "ppl": {"ppl": 9.0, "bpb": 2.0}}},
             {"label": "SFT", "model": {"path": "s"}, "tasks": {"synth": {"accuracy": 0.5, "n": 9},
                                                                  "ppl": {"ppl": 7.0, "bpb": 2.5}}},
             {"label": "DPO", "model": {"path": "d"}, "tasks": {"synth": {"accuracy": 0.5, "n": 9}}}]
    labels, cols, values, best = report.eval_table(evals)
    assert labels == ["base", "SFT", "DPO"] and cols == ["synth/accuracy", "ppl/ppl", "ppl/bpb"]
    assert values[2] == [0.5, None, None]
    assert best == [{1, 2}, {1}, {0}]     # ties share the mark; ppl and bpb: lower is better
    text = report.table_text(evals)
    assert "0.5000*" in text and "7.0000*" in text and "2.0000*" in text and "9.0000*" not in text
    assert report.compare_line(evals, ["base", "SFT"]).startswith("synth/accuracy: base 0.1000 -> SFT 0.5000")
    same = [dict(e, tasks={"synth": {"accuracy": 0.0}}) for e in evals]
    assert report.eval_table(same)[3] == [set()]      # nobody is best when all are equal


def test_metric_groups():
    rows = [{"step": i, "loss": 2.0 - i, "val_loss": 2.1 - i, "lr": 1e-3 * i, "rewards/chosen": 0.1 * i,
             "rewards/margin": i, "tokens_seen": 10 * i, "tokens_per_s": 5.0 + i, "kl": 0.01 * i, "kl_coef": 0.05,
             "approx_kl": i, "grad_norm": i, "logps/chosen": -i, "rewards/accuracy": 0.5 * i} for i in (1, 2)]
    assert report.metric_groups(rows) == {"loss": ["loss", "val_loss"], "lr": ["lr"], "logps": ["logps/chosen"],
                                          "reward": ["rewards/chosen", "rewards/margin"], "kl": ["kl", "approx_kl"],
                                          "tokens_per_s": ["tokens_per_s"], "grad_norm": ["grad_norm"],
                                          "accuracy": ["rewards/accuracy"]}


def test_sample_reward_and_rl_stages(tmp_path, capsys):
    import torch
    from tinygpt.checkpoint import save_model
    from tinygpt.config import ModelConfig, pad_vocab
    from tinygpt.model import GPT
    from tinygpt.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    base = tmp_path / "base.tinygpt"
    save_model(base, GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size))), tok)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "a good answer",
                                                              "rejected": "bad"}) + "\n" for i in range(8)))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    cfg = write(tmp_path, f"""
defaults: {{quiet: true, device: cpu, seed: 0}}
stages:
  - {{name: rm, cmd: reward, model: {base}, args: {{data: {tmp_path}/prefs.jsonl, steps: 2, batch: 2,
     val-split: 0.5}}}}
  - {{name: rl, cmd: grpo, model: {base}, args: {{prompts: {tmp_path}/qa.jsonl, reward-fn: format, group-size: 2,
     iterations: 2, batch: 2, max-new-tokens: 4, lora-rank: 2}}}}
  - {{name: show, cmd: sample, model: {base}, args: {{lora: "${{rl}}", prompt: Once, max-new-tokens: 6}}}}
""")
    run = tmp_path / "run"
    assert main(["pipeline", str(cfg), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    state = json.loads((run / "pipeline.json").read_text())
    assert "--out" not in state["stages"]["show"]["argv"]
    # the sample stage's artifact is exactly what `tinygpt sample` prints
    assert main(["sample", str(base), "--lora", str(run / "rl.lora"), "--prompt", "Once", "--max-new-tokens", "6",
                 "--seed", "0", "--device", "cpu"]) == 0
    assert (run / "show.txt").read_text() == capsys.readouterr().out and (run / "show.txt").read_text()[:4] == "Once"
    # RL rows carry step and a running token count, which the stages table shows
    rows = [json.loads(x) for x in (run / "rl.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and 0 < rows[0]["tokens_seen"] < rows[1]["tokens_seen"]
    md = (run / "report.md").read_text()
    assert re.search(rf"\| rl \| grpo \| done \| [\d.]+ \| 2 \| {report.human(rows[1]['tokens_seen'])} \|", md)
    # the reward model's held-out accuracy: in the printed summary and in report.md
    acc = [json.loads(x) for x in (run / "rm.run" / "metrics.jsonl").read_text().splitlines()][-1]["val_accuracy"]
    assert f"rm: held-out accuracy {acc:.4f}" in printed and f"held-out accuracy {acc:.4f}" in md
    # nothing to do the second time (the sample stage's artifact exists)
    lines = []
    pipeline.run_pipeline(cfg, run, log=lines.append)
    assert sum("skipped" in ln for ln in lines) == 3


@pytest.mark.slow   # the whole demo recipe: about 3-4 minutes on a 2-core CPU
def test_demo_preset_orders_base_sft_dpo(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["pipeline", "--preset", "demo", "--out", str(run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    acc = {name: json.loads((run / f"eval-{name}.json").read_text())["tasks"]["synth"]["accuracy"]
           for name in ("base", "sft", "dpo")}
    # held-out exact match: SFT learns the format, DPO drops the explanations exact match refuses
    assert acc["base"] < acc["sft"] - 0.2 and acc["sft"] + 0.02 < acc["dpo"], acc
    rm = [json.loads(x) for x in (run / "reward.run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0.5 < rm["val_accuracy"] <= 1 and f"reward: held-out accuracy {rm['val_accuracy']:.4f}" in printed
    prompt = "### Instruction:\nWhat is 9 plus 8?\n\n### Response:\n"
    for name in ("sample", "sample-dpo"):
        text = (run / f"{name}.txt").read_text()
        assert text.startswith(prompt) and len(text) > len(prompt), text


RESUME = """
name: r
defaults: {quiet: true, device: cpu, seed: 0}
stages:
  - {name: data, cmd: data synth, out: data, args: {scale: 0.05}}
  - name: base
    cmd: train
    args: {corpus: "${data}/corpus.txt", byte-tokenizer: true, preset: nano, steps: STEPS, batch: 2, ctx: 32,
           dtype: float32}
"""


def test_an_interrupted_stage_resumes_inside_the_stage(tmp_path, monkeypatch):
    import torch
    from tinygpt.io import load_tensors
    cfg = write(tmp_path, RESUME.replace("STEPS", "6"))
    pipeline.run_pipeline(cfg, tmp_path / "a", log=lambda *m: None)
    undo = ctrl_c_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, tmp_path / "b", log=lambda *m: None)
    state = json.loads((tmp_path / "b" / "pipeline.json").read_text())
    assert state["stages"]["base"]["status"] == "interrupted"
    undo()
    lines = []
    pipeline.run_pipeline(cfg, tmp_path / "b", log=lines.append)
    assert any("resuming its saved state" in ln for ln in lines)
    rows = [json.loads(x) for x in (tmp_path / "b" / "base.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]          # steps 4-6 only were trained again
    a, b = load_tensors(tmp_path / "a" / "base.tinygpt")[0], load_tensors(tmp_path / "b" / "base.tinygpt")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other settings: the saved state is refused and the stage starts again
    write(tmp_path, RESUME.replace("STEPS", "7"))
    ctrl_c_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, tmp_path / "b", log=lambda *m: None)


def test_sigterm_records_the_stage_as_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    cfg = write(tmp_path, RESUME.replace("STEPS", "100000"))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tinygpt.cli", "pipeline", str(cfg), "--out", str(run)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "base.run" / "metrics.jsonl").exists():
            time.sleep(0.2)                # until the training loop of the stage runs
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    state = json.loads((run / "pipeline.json").read_text())
    assert state["stages"]["base"]["status"] == "interrupted"
    assert (run / "base.run" / "state.safetensors").exists()
