"""PPO / GRPO: KL at the start, behaviour log-probs, toy rewards that must rise, prompt sources,
reward-model tokenizers, verifiable reward functions, and the command line end to end."""
import copy
import json

import pytest
import torch

from tinygpt.chat import get_template
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import Message
from tinygpt.errors import UserError
from tinygpt.lora import apply_lora
from tinygpt.model import GPT
from tinygpt.rewards import final_number, format_reward, get_reward_fn, gsm8k_reward, synth_reward
from tinygpt.rlhf import (GRPOTrainer, ModelReward, PPOTrainer, RLConfig, ValueNetwork, encode_prompts)
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """nano models run fastest on one thread (no thread hand-offs, no contention on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _tcfg(lr):
    return TrainConfig(steps=1, lr=lr, weight_decay=0.0, lr_schedule="constant", quiet=True)


def test_kl_is_zero_with_a_fresh_adapter_and_first_ratio_is_one(tmp_path):
    m, tok, prompts = _setup(sharp=True)
    apply_lora(m, 4, 8, name="rl")
    cfg = RLConfig(iterations=1, batch=4, max_new_tokens=6, minibatch=2)
    tr = PPOTrainer(m, tok, prompts, _frac_good, cfg, _tcfg(1e-3), tmp_path / "p.lora", reference="rl", stop_ids=[])
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
    cfg = RLConfig(iterations=30, batch=8, max_new_tokens=8, minibatch=8, epochs=4, kl_coef=0.01)
    tr = PPOTrainer(m, tok, prompts, _frac_good, cfg, _tcfg(1e-2), tmp_path / "p.tinygpt", reference=ref,
                    stop_ids=[])
    rewards = [tr.iteration(it)["reward_mean"] for it in range(cfg.iterations)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.4 and last > first + 0.3, rewards


def test_grpo_raises_exact_match_accuracy(tmp_path):
    m, tok, prompts = _setup()
    ref = copy.deepcopy(m).requires_grad_(False).eval()

    def first_token_right(episodes):
        return torch.tensor([float(e.tokens[0] in FIRST) for e in episodes])
    cfg = RLConfig(iterations=16, batch=8, group_size=8, max_new_tokens=4, minibatch=32, epochs=1, kl_coef=0.0)
    tr = GRPOTrainer(m, tok, prompts, first_token_right, cfg, _tcfg(1e-2), tmp_path / "g.tinygpt",
                     reference=ref, stop_ids=[])
    acc = [tr.iteration(it)["reward_mean"] for it in range(cfg.iterations)]
    assert sum(acc[:3]) / 3 < 0.25 and sum(acc[-3:]) / 3 > 0.6, acc


def test_group_advantages_reach_the_buffer_and_rloo_differs(tmp_path):
    m, tok, prompts = _setup()
    cfg = RLConfig(iterations=1, batch=2, group_size=4, max_new_tokens=3, kl_coef=0.0, rloo=True)
    tr = GRPOTrainer(m, tok, prompts, lambda eps: torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), cfg,
                     _tcfg(1e-3), tmp_path / "g.tinygpt", reference=None, stop_ids=[])
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
    from tinygpt.rlhf import Episode
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
    from tinygpt.reward import RewardModel
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
