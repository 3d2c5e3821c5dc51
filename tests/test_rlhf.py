"""PPO / GRPO: KL at the start, behaviour log-probs, toy rewards that must rise, prompt sources,
reward-model tokenizers, verifiable reward functions, and the command line end to end."""
import copy
import math
import json

import pytest
import torch

from tinygpt.chat import get_template
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import Message
from tinygpt.errors import UserError
from tinygpt.lora import apply_lora
from tinygpt.model import GPT
from tinygpt.verifiers import final_number, format_reward, get_reward_fn, gsm8k_reward, synth_reward
from tinygpt.rollout import ValueNetwork, encode_prompts
from tinygpt.stages.rl import GRPOTrainer, PPOTrainer
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare
from tinygpt.verifiers import ModelReward


pytestmark = pytest.mark.usefixtures("one_thread")


GOOD = set(range(5, 85))      # toy PPO reward: the share of response tokens in this set
FIRST = set(range(5, 37))     # toy GRPO task: the answer is "right" when the first token is in here


def _setup(sharp: bool = False, n_prompts: int = 16):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
    if sharp:  # non-trivial weights everywhere, so a fresh adapter has something to act on
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.3)
    rows = [([Message("user", f"question {i}")], None) for i in range(n_prompts)]
    prompts, dropped = encode_prompts(tok, get_template("chatml", tok), rows, 100)
    assert dropped == 0
    return m, tok, prompts


def _frac_good(episodes):
    return torch.tensor([sum(t in GOOD for t in e.tokens) / len(e.tokens) for e in episodes])


def _trainer(cls, m, tok, prompts, reward, out, lr=1e-3, reference=None, value=None, **opts):
    """An RL stage on an in-memory policy with a callable reward, set up but not trained; no stop
    tokens, so every completion has the full length."""
    o = cls.Options(out=str(out), lr=lr, lr_schedule="constant", quiet=True, device="cpu", dtype="float32", **opts)
    tr = cls(o, m, tok, prompts=prompts, reward=reward, value=value, reference=reference, stop_ids=[],
             log=lambda *a: None)
    prepare(tr)
    return tr


def test_kl_is_zero_with_a_fresh_adapter_and_first_ratio_is_one(tmp_path):
    m, tok, prompts = _setup(sharp=True)
    apply_lora(m, 4, 8, name="rl")
    tr = _trainer(PPOTrainer, m, tok, prompts, _frac_good, tmp_path / "p.lora", reference="rl", steps=1, batch=4,
                  max_new_tokens=6, minibatch=2)
    episodes = tr.rollout(0)
    buf, info, _ = tr.score(episodes)
    assert info["kl"] == 0.0 and torch.equal(buf.t["old_logp"], buf.t["ref_logp"])
    # the recomputed behaviour log-probs equal the sampler's, token by token
    for i, e in enumerate(episodes):
        torch.testing.assert_close(buf.t["old_logp"][i, :len(e.tokens)], torch.tensor(e.logprobs), atol=1e-5, rtol=0)
    # a minibatch gathered from the buffer reproduces them exactly: the first PPO ratio is 1
    mb = buf.gather(torch.tensor([2, 0]), tr.pad, tr.device)
    logp, values, _ = tr.net(mb["batch"])
    torch.testing.assert_close(logp, mb["old_logp"], atol=1e-6, rtol=0)
    torch.testing.assert_close(values, mb["values"], atol=1e-6, rtol=0)
    # and the KL is no longer zero once the adapter moves
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert tr.score(episodes)[1]["kl"] != 0.0


def test_ppo_raises_a_toy_reward(tmp_path):
    m, tok, prompts = _setup()
    ref = copy.deepcopy(m).requires_grad_(False).eval()
    tr = _trainer(PPOTrainer, m, tok, prompts, _frac_good, tmp_path / "p.tinygpt", lr=1e-2, reference=ref,
                  steps=30, batch=8, max_new_tokens=8, minibatch=8, ppo_epochs=4, kl_coef=0.01, full=True)
    rewards = [tr.iteration(tr.engine, it)["reward_mean"] for it in range(30)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.4 and last > first + 0.3, rewards


def test_grpo_raises_exact_match_accuracy(tmp_path):
    m, tok, prompts = _setup()
    ref = copy.deepcopy(m).requires_grad_(False).eval()

    def first_token_right(episodes):
        return torch.tensor([float(e.tokens[0] in FIRST) for e in episodes])
    tr = _trainer(GRPOTrainer, m, tok, prompts, first_token_right, tmp_path / "g.tinygpt", lr=1e-2, reference=ref,
                  steps=16, batch=8, group_size=8, max_new_tokens=4, minibatch=32, ppo_epochs=1, kl_coef=0.0,
                  full=True)
    acc = [tr.iteration(tr.engine, it)["reward_mean"] for it in range(16)]
    assert sum(acc[:3]) / 3 < 0.25 and sum(acc[-3:]) / 3 > 0.6, acc


def test_group_advantages_reach_the_buffer_and_rloo_differs(tmp_path):
    m, tok, prompts = _setup()
    tr = _trainer(GRPOTrainer, m, tok, prompts, lambda eps: torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]),
                  tmp_path / "g.tinygpt", reference=False, steps=1, batch=2, group_size=4, max_new_tokens=3,
                  kl_coef=0.0, rloo=True, full=True)
    buf, info, _ = tr.score(tr.rollout(0))
    adv = buf.t["advantages"][:, 0]
    # RLOO: r - mean of the other three; the all-equal group gets 0
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0]))
    assert info["zero_std_groups"] == 0.5
    assert torch.all(buf.t["advantages"][buf.mask == 0] == 0)


class _StandInRM(torch.nn.Module):
    """A reward model as `tinygpt.reward` defines it: GPT backbone + scalar head read at the last token."""

    def __init__(self, tok):
        super().__init__()
        torch.manual_seed(1)
        self.backbone = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
        self.score = torch.nn.Linear(64, 1)
        self.tokenizer, self.config = tok, self.backbone.config

    def score_texts(self, seqs):
        return torch.stack([self.score(self.backbone.hidden(torch.tensor([s]))[0, -1])[0] for s in seqs])


def test_reward_model_with_another_tokenizer_is_re_tokenized_or_refused(tmp_path):
    m, _, _ = _setup()
    policy_tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20] * 5, 300)
    tmpl = get_template("chatml", policy_tok)
    prompts, _ = encode_prompts(policy_tok, tmpl, [([Message("user", "the fox")], None)], 100)
    from tinygpt.rollout import Episode
    reply = "over the dog"
    ep = Episode(prompts[0], policy_tok.encode(reply + "<|im_end|>"), reply + "<|im_end|>", True, [])
    rm_tok = Tokenizer.byte_level()
    rm = _StandInRM(rm_tok)
    got = ModelReward(rm, policy_tok, tmpl)([ep])
    # the reward model sees its own encoding of the rendered prompt + reply + end marker
    want = rm.score_texts([rm_tok.encode("<|im_start|>user\nthe fox<|im_end|>\n<|im_start|>assistant\n"
                                         "over the dog<|im_end|>")])
    torch.testing.assert_close(got, want.detach())
    assert not ModelReward(rm, policy_tok, tmpl).same and ModelReward(rm, rm_tok, tmpl).same
    zephyr = get_template("zephyr", policy_tok)
    policy_tok.add_special_tokens(zephyr.special_tokens)
    with pytest.raises(UserError, match="lacks the chat template"):
        ModelReward(rm, policy_tok, zephyr)


def test_value_network_shared_and_separate():
    m, tok, prompts = _setup(sharp=True)
    from tinygpt.logprobs import make_batch
    b = make_batch([(p.ids + [7, 8], [0] * len(p.ids) + [1, 1]) for p in prompts[:3]], tok.pad_id)
    shared = ValueNetwork(64)
    assert torch.equal(shared(torch.randn(b.sel.numel(), 64)), torch.zeros(b.sel.numel()))  # zero init
    sep = ValueNetwork(64, backbone=m)
    torch.nn.init.normal_(sep.head.weight)
    h = m.hidden(b.idx, pos=b.pos, mask=b.attn_mask()).reshape(-1, 64)[b.sel]
    torch.testing.assert_close(sep(None, b), sep.head(h).squeeze(-1))


def test_reward_functions_by_hand(tmp_path, monkeypatch):
    assert final_number("so 3 + 4 = 7 #### 1,234") == 1234.0 and final_number("no digits") is None
    assert gsm8k_reward("q", "the total is 12.<|im_end|>", "Natalia ... 6 + 6 = 12\n#### 12") == 1.0
    assert gsm8k_reward("q", "12 apples, then 13", "#### 12") == 0.0
    assert synth_reward("q", "12<|im_end|>", "12") == 1.0 and synth_reward("q", "The answer is 12.", "12") == 0.0
    assert format_reward("q", "blue<|im_end|>") == 1.0
    assert format_reward("q", "blue") == pytest.approx(2 / 3) and format_reward("q", "<|im_end|>") == pytest.approx(2 / 3)
    (tmp_path / "myreward.py").write_text("def score(prompt, completion, answer):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    assert get_reward_fn("myreward:score")("p", "abc", None) == 3
    for bad in ("nope", "myreward:missing", "no_such_module_xyz:f"):
        with pytest.raises(UserError):
            get_reward_fn(bad)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_grpo_and_ppo_end_to_end_with_prompt_files_of_any_format(tmp_path):
    from tinygpt import load_model_and_tokenizer
    from tinygpt.checkpoint import save_model
    from tinygpt.cli import main
    m, tok, _ = _setup(sharp=True)
    save_model(tmp_path / "base.tinygpt", m, tok)
    _write_rows(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                                       {"role": "assistant", "content": "5"}]}] * 3)
    _write_rows(tmp_path / "prefs.jsonl", [{"prompt": "Name a colour.", "chosen": "red", "rejected": "7"}] * 3)
    _write_rows(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "answer": "#### 2"}] * 3)
    common = ["--iterations", "2", "--batch", "2", "--max-new-tokens", "4", "--quiet", "--device", "cpu",
              "--lora-rank", "2"]
    for i, data in enumerate(["sft.jsonl", "prefs.jsonl", "qa.jsonl"]):
        out = tmp_path / f"grpo{i}.lora"
        rc = main(["grpo", str(tmp_path / "base.tinygpt"), "--prompts", str(tmp_path / data), "--reward-fn",
                   "format", "--group-size", "2", "--out", str(out)] + common)
        assert rc == 0 and out.exists()
        rows = [json.loads(x) for x in (tmp_path / f"grpo{i}.run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1, 2]
        assert {"reward_mean", "reward_std", "kl", "clip_frac", "entropy", "response_len"} <= set(rows[0])
        assert (tmp_path / f"grpo{i}.run" / "samples.jsonl").read_text().count("\n") == 2 * 4
    model, _ = load_model_and_tokenizer(tmp_path / "base.tinygpt", lora=[tmp_path / "grpo0.lora"])
    out = tmp_path / "ppo.lora"
    rc = main(["ppo", str(tmp_path / "base.tinygpt"), "--lora", str(tmp_path / "grpo0.lora"), "--prompts",
               str(tmp_path / "qa.jsonl"), "--reward-fn", "gsm8k", "--out", str(out), "--minibatch", "2"] + common)
    assert rc == 0 and out.exists()
    row = json.loads((tmp_path / "ppo.run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"value_loss", "explained_var", "approx_kl"} <= set(row)
    # a reward model file (tinygpt.reward) as the reward
    from tinygpt.reward_model import RewardModel
    RewardModel(GPT(m.config), tok).save(tmp_path / "rm.tinygpt")
    rc = main(["ppo", str(tmp_path / "base.tinygpt"), "--prompts", str(tmp_path / "prefs.jsonl"), "--reward",
               str(tmp_path / "rm.tinygpt"), "--reward-dtype", "float32", "--out", str(tmp_path / "rm_ppo.lora")]
              + common)
    assert rc == 0 and (tmp_path / "rm_ppo.lora").exists()
    # user mistakes: one line, exit 2
    assert main(["grpo", str(tmp_path / "base.tinygpt"), "--prompts", str(tmp_path / "qa.jsonl"),
                 "--out", str(tmp_path / "x.lora")] + common) == 2
    assert main(["grpo", str(tmp_path / "base.tinygpt"), "--prompts", str(tmp_path / "missing.jsonl"),
                 "--reward-fn", "synth", "--out", str(tmp_path / "x.lora")] + common) == 2
    assert not (tmp_path / "x.lora").exists()


# ---- KL control, early stop, k3 in the reward, named references, value files, reward plug-ins ----
def test_adaptive_kl_controller_by_hand(tmp_path):
    from tinygpt.rollout import AdaptiveKL
    kl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    kl.update(12.0, 64)                      # error 12 / 6 - 1 = 1, clipped to +0.2
    assert kl.coef == pytest.approx(0.1 * 1.00128, rel=1e-12)
    kl.update(5.4, 64)                       # error 5.4 / 6 - 1 = -0.1
    assert kl.coef == pytest.approx(0.1 * 1.00128 * 0.99936, rel=1e-12)
    kl.update(0.0, 5000)                     # error -1, clipped to -0.2, over half the horizon
    assert kl.coef == pytest.approx(0.1 * 1.00128 * 0.99936 * 0.9, rel=1e-12)
    fixed = AdaptiveKL(0.1, target=0.0, horizon=10000)
    fixed.update(50.0, 64)
    assert fixed.coef == 0.1                 # no target: a fixed coefficient
    # in the trainer: each scored rollout moves the coefficient by its measured KL and its N sequences
    m, tok, prompts = _setup(sharp=True)
    apply_lora(m, 4, 8, name="rl")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)            # the policy has moved: the KL is not 0
    tr = _trainer(PPOTrainer, m, tok, prompts, _frac_good, tmp_path / "p.lora", reference="rl", steps=1, batch=4,
                  max_new_tokens=6, minibatch=2, kl_coef=0.2, kl_target=0.01, kl_horizon=100)
    _, info, _ = tr.score(tr.rollout(0))
    err = max(-0.2, min(0.2, info["kl"] / 0.01 - 1))
    assert info["kl_coef"] == 0.2 and err != 0
    assert tr.kl.coef == pytest.approx(0.2 * (1 + err * 4 / 100), rel=1e-9)


def test_max_kl_stops_the_epochs_early(tmp_path):
    m, tok, prompts = _setup(sharp=True)
    apply_lora(m, 4, 8, name="rl")
    runs = {}
    for max_kl in (0.0, 1e-9):
        tr = _trainer(PPOTrainer, copy.deepcopy(m), tok, prompts, _frac_good, tmp_path / f"{max_kl}.lora", lr=1e-2,
                      reference="rl", steps=1, batch=8, max_new_tokens=6, minibatch=2, ppo_epochs=4, kl_coef=0.0,
                      max_kl=max_kl)
        runs[max_kl] = tr.iteration(tr.engine, 0)
    assert runs[0.0]["updates"] == 4 * 4 and runs[0.0]["early_stop"] == 0
    # the first minibatch sees ratio 1 (KL 0); after one step the KL exceeds the limit: stop there
    assert runs[1e-9]["updates"] == 2 and runs[1e-9]["early_stop"] == 1


def test_ppo_rewards_carry_the_k3_penalty_by_hand(tmp_path):
    m, tok, prompts = _setup()
    apply_lora(m, 2, 4, name="rl")
    tr = _trainer(PPOTrainer, m, tok, prompts, _frac_good, tmp_path / "p.lora", reference="rl", steps=1, batch=2,
                  kl_coef=0.5, kl_kind="k3", gamma=1.0, lam=1.0, whiten=False)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out, _ = tr.advantages(torch.tensor([2.0, -1.0]), old, ref, torch.zeros(2, 3), mask)

    def k3(d):
        return math.exp(-d) - 1 + d
    # reward per token: -0.5 * k3(logp - ref), plus the score at the last response token; with
    # gamma = lambda = 1 and V = 0 the returns (and advantages) are the rewards still to come
    r = [-0.5 * k3(0.5), -0.5 * k3(-1.0), -0.5 * k3(0.0) + 2.0]
    want = torch.tensor([[r[0] + r[1] + r[2], r[1] + r[2], r[2]], [-0.5 * k3(0.5) - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(out["returns"], want)
    torch.testing.assert_close(out["advantages"], want)


@pytest.mark.parametrize("cls", [PPOTrainer, GRPOTrainer])
def test_a_named_reference_needs_that_adapter(tmp_path, cls):
    m, tok, prompts = _setup()
    def build():
        return _trainer(cls, m, tok, prompts, _frac_good, tmp_path / "x.lora", reference="rl", steps=1, batch=2,
                        group_size=2)
    with pytest.raises(ValueError, match="the policy has none of that name"):
        build()                              # reference "rl", no adapter at all
    apply_lora(m, 2, 4, name="other")
    with pytest.raises(ValueError, match="'rl'"):
        build()
    apply_lora(m, 2, 4, name="rl")
    assert build().reference == "rl"


def test_separate_value_network_is_saved_and_round_trips(tmp_path):
    from tinygpt.checkpoint import load_model, save_model
    from tinygpt.logprobs import make_batch
    from tinygpt.rollout import VALUE_FILE, load_value_network
    m, tok, prompts = _setup(sharp=True)
    backbone = copy.deepcopy(m).requires_grad_(True).train()
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    apply_lora(m, 2, 4, name="rl")
    value = ValueNetwork(64, backbone)
    _trainer(PPOTrainer, m, tok, prompts, _frac_good, tmp_path / "p.lora", lr=1e-2, reference="rl", value=value,
             steps=1, batch=4, max_new_tokens=4, minibatch=4, ppo_epochs=2).train()
    assert any(not torch.equal(start[k], v) for k, v in backbone.state_dict().items())   # the backbone trained
    assert value.head.weight.abs().sum() > 0                                            # and its head
    back = load_value_network(tmp_path / "p.run" / VALUE_FILE)
    b = make_batch([(p.ids + [7, 8], [0] * len(p.ids) + [1, 1]) for p in prompts[:3]], tok.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(back(None, b), value(None, b), atol=0, rtol=0)
    with pytest.raises(UserError):
        load_model(tmp_path / "p.run" / VALUE_FILE)      # not a language model to sample from
    save_model(tmp_path / "lm.tinygpt", m, tok)
    with pytest.raises(UserError, match="not a value network"):
        load_value_network(tmp_path / "lm.tinygpt")


def test_two_argument_reward_functions_and_their_failures(tmp_path, monkeypatch):
    from tinygpt.verifiers import FunctionReward
    from tinygpt.rollout import Episode, Prompt
    (tmp_path / "tworew.py").write_text(
        "def short(prompt, completion):\n    return 1.0 if len(completion) < 5 else 0.0\n"
        "def boom(prompt, completion, answer=None):\n    raise KeyError('no such thing')\n"
        "def needs_scale(prompt, completion, *, scale):\n    return scale\n"
        "def not_a_number(prompt, completion):\n    return 'high'\n")
    monkeypatch.chdir(tmp_path)
    short = get_reward_fn("tworew:short")
    assert short("p", "abc", "an answer") == 1.0 and short("p", "abcdefgh", None) == 0.0
    with pytest.raises(UserError, match="tworew:boom.*KeyError"):
        get_reward_fn("tworew:boom")("p", "c", None)
    with pytest.raises(UserError, match="tworew:not_a_number"):
        get_reward_fn("tworew:not_a_number")("p", "c", None)
    with pytest.raises(UserError, match="signature"):
        get_reward_fn("tworew:needs_scale")
    eps = [Episode(Prompt([Message("user", "q?")], "4", "", []), [], text, True, []) for text in ("ab", "abcdef")]
    seen = []
    two = FunctionReward(lambda prompt, completion: seen.append(prompt) or len(completion))
    assert two(eps).tolist() == [2.0, 6.0] and seen == ["q?", "q?"]
    assert FunctionReward(lambda p, c, a: float(a))(eps).tolist() == [4.0, 4.0]


def test_cli_grpo_with_a_two_argument_reward_plugin(tmp_path, monkeypatch, capsys):
    from tinygpt.checkpoint import save_model
    from tinygpt.cli import main
    m, tok, _ = _setup(sharp=True)
    save_model(tmp_path / "base.tinygpt", m, tok)
    _write_rows(tmp_path / "qa.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)])
    (tmp_path / "plug2.py").write_text("def reward(prompt, completion):\n    return float(len(completion))\n"
                                       "def broken(prompt, completion):\n    return 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    common = ["--prompts", "qa.jsonl", "--iterations", "1", "--batch", "2", "--group-size", "2",
              "--max-new-tokens", "4", "--quiet", "--device", "cpu", "--lora-rank", "2"]
    assert main(["grpo", "base.tinygpt", "--reward-fn", "plug2:reward", "--out", "g.lora"] + common) == 0
    samples = [json.loads(x) for x in (tmp_path / "g.run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["reward"] == len(s["completion"]) for s in samples)
    capsys.readouterr()
    assert main(["grpo", "base.tinygpt", "--reward-fn", "plug2:broken", "--out", "b.lora"] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plug2:broken" in err[0] and "ZeroDivisionError" in err[0]
    assert not (tmp_path / "b.lora").exists()


@pytest.mark.parametrize("cls", [PPOTrainer, GRPOTrainer])
def test_compile_runs_compiled_blocks_in_the_updates_only_and_trains_the_same(tmp_path, monkeypatch, cls):
    """--compile in RL stages: the policy's blocks are compiled for its training forwards only;
    rollouts and scoring (eval mode, no gradients) run the eager blocks. With torch.compile
    replaced by a counting identity, the run equals the one without --compile."""
    calls = {"compiled": 0}

    class Counting(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args):
            assert torch.is_grad_enabled() and self.block.training
            calls["compiled"] += 1
            return self.block(*args)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: Counting(module))
    weights = []
    for compiled in (False, True):
        m, tok, prompts = _setup(sharp=True)
        apply_lora(m, 4, 8, name="rl")
        extra = {"group_size": 2} if cls is GRPOTrainer else {}
        tr = _trainer(cls, m, tok, prompts, _frac_good, tmp_path / f"{compiled}.lora", reference="rl", steps=2,
                      batch=4, max_new_tokens=6, minibatch=4, compile=compiled, **extra)
        for it in range(2):
            tr.iteration(tr.engine, it)
        weights.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    n_blocks = m.config.n_layer
    assert calls["compiled"] > 0 and calls["compiled"] % n_blocks == 0
    for n, w in weights[0].items():
        assert torch.equal(w, weights[1][n]), n
    assert not copy.deepcopy(m)._train_blocks                  # a copy starts without them
