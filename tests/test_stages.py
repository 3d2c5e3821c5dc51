"""The stage protocol, across stages: the one chat-template rule in every command that renders chat,
and resume equal to an uninterrupted run for every training stage (RL included)."""
import json
from types import SimpleNamespace

import pytest
import torch

import tinygpt.commands.evaluate as evaluate_mod
import tinygpt.commands.generate_data as generate_data_mod
import tinygpt.commands.generation as generation_mod
import tinygpt.eval.harness as harness_mod
import tinygpt.stages.distill as distill_mod
import tinygpt.stages.preference as preference_mod
import tinygpt.stages.reward as reward_mod
import tinygpt.stages.rl as rl_mod
import tinygpt.stages.sft as sft_mod
import tinygpt.train.engine as engine_mod
from tinygpt.chat import get_template
from tinygpt.checkpoint import save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.errors import UserError
from tinygpt.io import load_tensors
from tinygpt.stages.common import default_lr
from tinygpt.lora import apply_lora, save_adapter
from tinygpt.model import GPT
from tinygpt.stages.common import resolve_template, template_record
from tinygpt.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
JINJA = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _base(tmp_path, chat_template=None, block_size: int = 128, std: float = 0.05, name: str = "base.tinygpt"):
    """A byte-level nano model with random matrices (std) saved as tmp_path/name; (model, tokenizer)."""
    tok = Tokenizer.byte_level()
    tok.chat_template = chat_template
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=block_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    save_model(tmp_path / name, model, tok)
    return model, tok


def _adapter(tmp_path, model, name, template):
    apply_lora(model, 2, 4, name=name)
    save_adapter(model, tmp_path / f"{name}.lora", name, template_record(get_template(template)) if template else {})
    return str(tmp_path / f"{name}.lora")


def test_the_template_rule_by_hand(tmp_path):
    model, tok = _base(tmp_path)
    a = _adapter(tmp_path, model, "a", "alpaca")
    b = _adapter(tmp_path, model, "b", "alpaca")
    c = _adapter(tmp_path, model, "c", "zephyr")
    plain = _adapter(tmp_path, model, "plain", None)
    base = tmp_path / "base.tinygpt"
    assert resolve_template("llama3", tok, base, [a, c]).name == "llama3"          # explicit wins
    assert resolve_template(None, tok, base, [a, plain, b]).name == "alpaca"        # recorded, agreeing
    with pytest.raises(UserError, match=r"different chat templates \(a.lora: alpaca, c.lora: zephyr\)"):
        resolve_template(None, tok, base, [a, c])
    assert resolve_template(None, tok, base, [plain]).name == "chatml"              # nothing recorded: chatml
    tok.chat_template = JINJA
    assert resolve_template(None, tok, base, [plain]).name == "hf"                  # else the tokenizer's own
    assert resolve_template(None, tok, base, [plain], fallback=False) is None
    save_model(tmp_path / "full.tinygpt", model, tok, template_record(get_template("zephyr")))
    assert resolve_template(None, tok, tmp_path / "full.tinygpt").name == "zephyr"  # a model trained here


def _files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": "yes", "rejected": f"no {i}"})
                                                  + "\n" for i in range(8)))
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": "yes", "label": i % 2 == 0})
                                                + "\n" for i in range(8)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "answer": "yes"}) + "\n"
                                                 for i in range(4)))


def _teacher(tmp_path, model) -> None:
    """t.lora: the distillation teacher, the base with a random adapter on it."""
    torch.manual_seed(5)
    apply_lora(model, 2, 4, name="t")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "t.lora", "t")


def test_every_command_that_renders_chat_resolves_the_same_template(tmp_path, monkeypatch):
    """One table over all commands: with an adapter that recorded `alpaca` and a tokenizer with its own
    chat template, every command renders with alpaca (explicit --template would win everywhere)."""
    model, tok = _base(tmp_path, chat_template=JINJA)
    sft = _adapter(tmp_path, model, "sft", "alpaca")
    _files(tmp_path)
    seen = []

    def spy(real):
        def wrapped(*a, **k):
            t = real(*a, **k)
            seen.append(t.name if t is not None else None)
            return t
        return wrapped
    for mod in (sft_mod, reward_mod, preference_mod, rl_mod, generation_mod, harness_mod, evaluate_mod, distill_mod,
                generate_data_mod):
        monkeypatch.setattr(mod, "resolve_template", spy(mod.resolve_template))
    base = str(tmp_path / "base.tinygpt")
    common = ["--device", "cpu", "--quiet", "--steps", "1", "--batch", "2", "--lora", sft]
    rm = str(tmp_path / "rm.tinygpt")
    runs = {
        "sft": ["sft", base, "--data", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "s2.lora"), *common],
        "reward": ["reward", base, "--data", str(tmp_path / "prefs.jsonl"), "--out", rm, *common],
        "dpo": ["dpo", base, "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "d.lora"), *common],
        "orpo": ["orpo", base, "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "o.lora"), *common],
        "kto": ["kto", base, "--data", str(tmp_path / "kto.jsonl"), "--out", str(tmp_path / "k.lora"), *common],
        "grpo": ["grpo", base, "--prompts", str(tmp_path / "sft.jsonl"), "--reward-fn", "format", "--group-size", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "g.lora"), *common],
        "ppo": ["ppo", base, "--prompts", str(tmp_path / "sft.jsonl"), "--reward", rm, "--max-new-tokens", "4",
                "--out", str(tmp_path / "p.lora"), *common],
        "distill": ["distill", base, "--teacher", base, "--data", str(tmp_path / "sft.jsonl"), "--out",
                    str(tmp_path / "kd.lora"), *common],
        "generate": ["generate", base, "--lora", sft, "--prompts", str(tmp_path / "sft.jsonl"), "--out",
                     str(tmp_path / "g.jsonl"), "--max-new-tokens", "2", "--device", "cpu", "--quiet"],
        "eval": ["eval", base, "--lora", sft, "--tasks", "synth", "--data", str(tmp_path / "eval.jsonl"), "--device",
                 "cpu", "--quiet", "--max-new-tokens", "2"],
        "score": ["score", rm, "--prompt", "q1?", "--text", "yes", "--device", "cpu"],
    }
    for name, argv in runs.items():
        seen.clear()
        assert main(argv) == 0, name
        assert seen and set(seen) == {"alpaca"}, (name, seen)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    seen.clear()
    assert main(["chat", base, "--lora", sft, "--device", "cpu", "--max-new-tokens", "2"]) == 0
    assert seen == ["alpaca"]
    for out in ("s2.lora", "d.lora", "o.lora", "k.lora", "g.lora", "p.lora", "kd.lora"):   # and each records it
        assert load_tensors(tmp_path / out)[1]["chat_template"] == "alpaca", out
    assert load_tensors(rm)[1]["chat_template"] == "alpaca"


# ---- resume equals uninterrupted, every stage ---------------------------------------------------
STAGES = {
    "train": lambda p: ["train", "--corpus", str(p / "corpus.txt"), "--preset", "nano", "--byte-tokenizer",
                        "--ctx", "32", "--batch", "2", "--lr", "3e-3"],
    "train-muon": lambda p: ["train", "--corpus", str(p / "corpus.txt"), "--preset", "nano", "--byte-tokenizer",
                             "--ctx", "32", "--batch", "2", "--lr", "3e-3", "--optimizer", "muon"],
    "sft": lambda p: ["sft", str(p / "base.tinygpt"), "--data", str(p / "sft.jsonl"), "--batch", "2", "--lr", "1e-2"],
    "reward": lambda p: ["reward", str(p / "base.tinygpt"), "--data", str(p / "prefs.jsonl"), "--batch", "2",
                         "--lr", "1e-3", "--val-split", "0"],
    "dpo": lambda p: ["dpo", str(p / "base.tinygpt"), "--data", str(p / "prefs.jsonl"), "--batch", "2", "--lr", "1e-2"],
    "orpo": lambda p: ["orpo", str(p / "base.tinygpt"), "--data", str(p / "prefs.jsonl"), "--batch", "2",
                       "--lr", "1e-2"],
    "kto": lambda p: ["kto", str(p / "base.tinygpt"), "--data", str(p / "kto.jsonl"), "--batch", "2", "--lr", "1e-2"],
    "grpo": lambda p: ["grpo", str(p / "base.tinygpt"), "--prompts", str(p / "sft.jsonl"), "--reward-fn", "format",
                       "--group-size", "2", "--batch", "2", "--max-new-tokens", "4", "--lr", "1e-2"],
    "distill": lambda p: ["distill", str(p / "base.tinygpt"), "--teacher", str(p / "base.tinygpt"), "--teacher-lora",
                          str(p / "t.lora"), "--data", str(p / "sft.jsonl"), "--batch", "2", "--lr", "1e-2",
                          "--alpha", "0.5", "--lmbda", "0.5", "--max-new-tokens", "4"],
    "ppo": lambda p: ["ppo", str(p / "base.tinygpt"), "--prompts", str(p / "sft.jsonl"), "--reward-fn", "format",
                      "--batch", "2", "--max-new-tokens", "4", "--minibatch", "2", "--lr", "1e-2",
                      "--kl-target", "0.1"],
}
SUFFIX = {"train": ".tinygpt", "train-muon": ".tinygpt", "reward": ".tinygpt"}


def ctrl_c_at(monkeypatch, step: int):
    """Make training raise KeyboardInterrupt (Ctrl-C) when it reaches `step`; returns the undo."""
    real = engine_mod.Engine._round

    def stop(self):
        if self.round == step:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(engine_mod.Engine, "_round", stop)
    return lambda: monkeypatch.setattr(engine_mod.Engine, "_round", real)


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_equals_uninterrupted(stage, tmp_path, monkeypatch):
    model, _ = _base(tmp_path)
    _files(tmp_path)
    if stage == "distill":
        _teacher(tmp_path, model)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"doc {i}: the cat sat on mat {i}." for i in range(40)))
    ext = SUFFIX.get(stage, ".lora")
    argv = STAGES[stage](tmp_path) + ["--steps", "4", "--seed", "3", "--device", "cpu", "--dtype", "float32",
                                      "--quiet", "--save-every", "1"]
    straight, resumed = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
    assert main(argv + ["--out", str(straight)]) == 0
    undo = ctrl_c_at(monkeypatch, 2)
    assert main(argv + ["--out", str(resumed)]) == 130
    undo()
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    a, b = load_tensors(straight)[0], load_tensors(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    rows = [json.loads(x) for x in (tmp_path / "b.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]                  # cut back to the state, no duplicates
    want = [json.loads(x) for x in (tmp_path / "a.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]


@pytest.mark.parametrize("stage", ["train", "sft"])
def test_loss_chunk_trains_what_the_whole_head_trains(stage, tmp_path):
    """--loss-chunk (the head and its loss a chunk of positions at a time) gives the losses of the
    run without it to float32 rounding, and its weights to a fraction of one step: the gradients
    agree to rounding (tests/test_model.py), but Adam normalises each step, so a rounding-sized
    difference in a near-zero gradient can move a weight by part of a learning rate."""
    _base(tmp_path)
    _files(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"doc {i}: the cat sat on mat {i}." for i in range(40)))
    argv = STAGES[stage](tmp_path) + ["--steps", "3", "--device", "cpu", "--dtype", "float32", "--quiet"]
    ext = SUFFIX.get(stage, ".lora")
    assert main(argv + ["--out", str(tmp_path / f"a{ext}")]) == 0
    assert main(argv + ["--loss-chunk", "5", "--out", str(tmp_path / f"b{ext}")]) == 0
    a, b = load_tensors(tmp_path / f"a{ext}")[0], load_tensors(tmp_path / f"b{ext}")[0]
    assert a.keys() == b.keys()
    lr = float(argv[argv.index("--lr") + 1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=lr / 5, msg=k)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / f"{n}.run" / "metrics.jsonl").read_text().splitlines()]
              for n in "ab"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_lora_path_weight_pairs():
    from tinygpt.stages.common import ModelOptions, lora_specs
    assert lora_specs(ModelOptions(model="m", lora=["a.lora", "b.lora:0.5"])) == [("a.lora", 1.0), ("b.lora", 0.5)]
    # the older spelling: --lora-weight pairs with the --lora at the same position
    assert lora_specs(ModelOptions(model="m", lora=["a.lora", "b.lora"], lora_weight=[0.25])) == \
        [("a.lora", 0.25), ("b.lora", 1.0)]
    assert lora_specs(ModelOptions(model="m", lora=["dir:x/a.lora"])) == [("dir:x/a.lora", 1.0)]   # not a weight
    for bad, what in (({"lora": ["a.lora"], "lora_weight": [0.5, 0.5]}, "2 --lora-weight for 1 --lora"),
                      ({"lora": ["a.lora:0.5"], "lora_weight": [0.5]}, "has a weight and a --lora-weight"),
                      ({"lora": ["a.lora:inf"]}, "finite")):
        with pytest.raises(UserError, match=what):
            ModelOptions(model="m", **bad)
# ---- keep-best, every stage that validates ------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "sft", "reward", "dpo", "orpo", "kto"])
def test_keep_best_writes_the_artifact_at_each_new_lowest_validation_only(stage, tmp_path, monkeypatch):
    _base(tmp_path)
    _files(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"doc {i}: the cat sat on mat {i}." for i in range(40)))
    out = tmp_path / f"k{SUFFIX.get(stage, '.lora')}"
    saves = []
    real_init = engine_mod.Engine.__init__

    def init(self, st, *a, **k):           # record every artifact write: its round and the file it left
        real_init(self, st, *a, **k)
        real_save = st.save

        def save(final):
            real_save(final)
            saves.append((self.round, out.read_bytes()))
        st.save = save
    monkeypatch.setattr(engine_mod.Engine, "__init__", init)
    argv = STAGES[stage](tmp_path)
    if "--val-split" in argv:              # the resume table turns validation off for the reward stage
        del argv[argv.index("--val-split"):argv.index("--val-split") + 2]
    assert main(argv + ["--steps", "6", "--val-split", "0.25", "--val-every", "1", "--keep-best", "--lr", "5e-2",
                        "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "k.run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows]
    lowest = [r["step"] for i, r in enumerate(rows) if r["val_loss"] < min(vals[:i], default=float("inf"))]
    assert [r for r, _ in saves] == lowest, (stage, vals)          # written at each new lowest, never after
    assert rows[-1]["best_val_loss"] == min(vals)
    # the file holds the last lowest's weights; the end of the run only marks it complete
    (final, meta), (best, _) = load_tensors(out), load_tensors(_bytes_file(tmp_path, saves[-1][1]))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    assert meta["training_status"] == "complete" and float(meta["best_val_loss"]) == min(vals)


def _bytes_file(folder, data: bytes):
    path = folder / "saved.safetensors"
    path.write_bytes(data)
    return path


def test_default_learning_rates_scale_with_the_model_width():
    """The published rate at width >= 2048, times 2048/width below it, at most 32x; --lr wins."""
    logged = []
    for width, want in ((4096, 2e-4), (2048, 2e-4), (768, 2e-4 * 2048 / 768), (128, 3.2e-3), (32, 6.4e-3)):
        model = SimpleNamespace(config=SimpleNamespace(n_embd=width))
        assert default_lr(SimpleNamespace(lr=None), 2e-4, model, logged.append) == pytest.approx(want)
    assert "--lr to choose" in logged[-1] and len(logged) == 5
    assert default_lr(SimpleNamespace(lr=1e-3), 2e-4, model, logged.append) == 1e-3 and len(logged) == 5


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_completion_length_defaults_to_fit_the_context(stage, tmp_path):
    """A 64-position base: the default --max-new-tokens is half of it (32), leaving room for the
    prompts (64 new tokens would leave none: 'no prompts to train on')."""
    _base(tmp_path, block_size=64)
    _files(tmp_path)
    argv = STAGES[stage](tmp_path)
    del argv[argv.index("--max-new-tokens"):argv.index("--max-new-tokens") + 2]
    out = tmp_path / "rl.lora"
    assert main(argv + ["--steps", "1", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    row = json.loads((tmp_path / "rl.run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["response_len"] <= 32 and row["response_tokens"] <= 32 * 4   # 4 sequences, at most 32 each
