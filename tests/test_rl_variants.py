"""GRPO loss types (grpo, dr_grpo, dapo, gspo), asymmetric clipping and reward scaling: every
formula by hand, and the trainer: the default is the token-level loss it always was, and each
--loss-type trains from the command line."""
import math

import pytest
import torch

from tinygpt import losses as L
from tinygpt.stages.rl import GRPOOptions, GRPOTrainer
from tinygpt.errors import UserError

# Two sequences: sequence 0 has two tokens with ratios 1.5 and 0.5 and advantage +1; sequence 1
# one token with ratio 1.1 and advantage -2. With eps 0.2 the token objectives
# l = max(-A r, -A clip(r, 0.8, 1.2)) are -1.2 (clipped), -0.5 and 2.2.
RATIOS = [1.5, 0.5, 1.1]
SEQ = torch.tensor([0, 0, 1])
ADV = torch.tensor([1.0, 1.0, -2.0])


def _inputs(requires_grad=False):
    old = torch.tensor([-1.0, -2.0, -0.5])
    logp = (old + torch.tensor(RATIOS).log()).requires_grad_(requires_grad)
    return logp, old


@pytest.mark.parametrize("loss_type, want", [
    ("dapo", (-1.2 - 0.5 + 2.2) / 3),                       # every token weighs the same
    ("grpo", ((-1.2 - 0.5) / 2 + 2.2) / 2),                 # mean of per-sequence means
    ("dr_grpo", (-1.2 - 0.5 + 2.2) / (2 * 4)),              # sum / (N * L_max), L_max = 4
    ("gspo", (-math.sqrt(1.5 * 0.5) + 2.2) / 2),            # s_0 = sqrt(0.75) (geometric mean), inside the clip
])
def test_each_grpo_loss_type_by_hand(loss_type, want):
    logp, old = _inputs()
    loss, clip_frac, approx_kl = L.grpo_policy_loss(logp, old, ADV, SEQ, 2, loss_type, 0.2, 0.2, max_len=4)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    k3 = sum(r - 1 - math.log(r) for r in RATIOS) / 3
    assert approx_kl.item() == pytest.approx(k3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.0 if loss_type == "gspo" else 1 / 3, abs=1e-6)


def test_clip_higher_and_gspo_sequence_clipping_by_hand():
    logp, old = _inputs()
    # DAPO's clip-higher: the first token's ratio 1.5 is now clipped at 1.28 instead of 1.2
    loss, _, _ = L.grpo_policy_loss(logp, old, ADV, SEQ, 2, "dapo", 0.2, 0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 2.2) / 3, abs=1e-6)
    # GSPO with the paper's tiny range: s_0 = 0.866 is clipped to 1 - 3e-4 (A > 0: the min keeps the lower
    # objective, the unclipped -0.866); s_1 = 1.1 with A < 0 is clipped at 1 + 4e-4: max(2.2, 2 * 1.0004) = 2.2
    loss, clip_frac, _ = L.grpo_policy_loss(logp, old, ADV, SEQ, 2, "gspo", 3e-4, 4e-4)
    assert loss.item() == pytest.approx((-math.sqrt(0.75) + 2.2) / 2, abs=1e-6)
    assert clip_frac.item() == 0.0
    # a sequence above the range with a positive advantage is clipped: no gradient from it
    loss, clip_frac, _ = L.grpo_policy_loss(torch.log(torch.tensor([1.5])), torch.zeros(1), torch.ones(1),
                                            torch.zeros(1, dtype=torch.long), 1, "gspo", 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clip_frac.item() == 1.0


def test_gspo_gradient_is_the_sequence_ratio_over_its_length():
    """d/d logp_t of (1/N) sum_i -A_i s_i = -A_i s_i / (N |o_i|) for every token of an unclipped sequence."""
    logp, old = _inputs(requires_grad=True)
    loss, _, _ = L.grpo_policy_loss(logp, old, ADV, SEQ, 2, "gspo", 0.2, 0.2)
    loss.backward()
    s0 = math.sqrt(0.75)
    torch.testing.assert_close(logp.grad, torch.tensor([-s0 / 4, -s0 / 4, 2 * 1.1 / 2]))


def test_grpo_and_dapo_gradients_weigh_tokens_differently():
    logp, old = _inputs(requires_grad=True)
    L.grpo_policy_loss(logp, old, ADV, SEQ, 2, "grpo", 0.2, 0.2)[0].backward()
    # grpo: token 1 of sequence 0 weighs 1 / (N |o_0|) = 1/4; the clipped token 0 has none; d(-A r)/dlogp = -A r
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5 / 4, 2.2 / 2]))
    logp.grad = None
    L.grpo_policy_loss(logp, old, ADV, SEQ, 2, "dapo", 0.2, 0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5 / 3, 2.2 / 3]))


def test_aggregation_of_a_per_token_term_and_the_units():
    x = torch.tensor([1.0, 3.0, 8.0])
    assert L.aggregate_tokens(x, SEQ, 2, "dapo").item() == pytest.approx(4.0)
    assert L.aggregate_tokens(x, SEQ, 2, "grpo").item() == pytest.approx((2.0 + 8.0) / 2)
    assert L.aggregate_tokens(x, SEQ, 2, "gspo").item() == pytest.approx(5.0)
    assert L.aggregate_tokens(x, SEQ, 2, "dr_grpo", max_len=4).item() == pytest.approx(12.0 / 8)
    assert L.loss_units("dapo", 3, 2) == 3 and L.loss_units("grpo", 3, 2) == 2
    with pytest.raises(ValueError):
        L.grpo_policy_loss(*_inputs(), ADV, SEQ, 2, "ppo")
    with pytest.raises(ValueError):
        L.aggregate_tokens(x, SEQ, 2, "dr_grpo")


def test_reward_scaling_group_batch_none_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 4.0])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, -0.5, -0.5, -0.5, 1.5])
    g0, g1 = torch.tensor([1.0, 0, 0, 0]).std(), torch.tensor([2.0, 2, 2, 4]).std()
    group = L.group_advantages(r, 4, scale="group")
    torch.testing.assert_close(group, torch.cat([centred[:4] / (g0 + 1e-4), centred[4:] / (g1 + 1e-4)]))
    torch.testing.assert_close(L.group_advantages(r, 4, scale="batch"), centred / (r.std() + 1e-4))
    torch.testing.assert_close(L.group_advantages(r, 4, scale="none"), centred)
    # the older switch still reads the same way
    torch.testing.assert_close(L.group_advantages(r, 4, normalize_std=False), centred)
    torch.testing.assert_close(L.group_advantages(r, 4), group)
    with pytest.raises(ValueError):
        L.group_advantages(r, 4, scale="global")


def test_the_default_loss_is_the_token_level_ppo_surrogate_bit_for_bit():
    """--loss-type dapo with --clip is what GRPO always computed: ppo_policy_loss over the minibatch's tokens."""
    torch.manual_seed(0)
    logp, old, adv = torch.randn(17), torch.randn(17), torch.randn(17)
    seq = torch.sort(torch.randint(0, 5, (17,))).values
    want = L.ppo_policy_loss(logp, old, adv, torch.ones_like(logp), 0.2)
    got = L.grpo_policy_loss(logp, old, adv, seq, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    o = GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora")
    tr = GRPOTrainer(o)
    assert o.loss_type == "dapo" and tr.clip_range() == (0.2, 0.2) and tr.reward_scale() == "group"
    assert GRPOTrainer(GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora", normalize_std=False)) \
        .reward_scale() == "none"
    assert GRPOTrainer(GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora", loss_type="dr_grpo")) \
        .reward_scale() == "none"
    gspo = GRPOTrainer(GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora", loss_type="gspo"))
    assert gspo.clip_range() == (3e-4, 4e-4)
    with pytest.raises(UserError, match="contradict"):
        GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora", normalize_std=False, scale_rewards="group")
    with pytest.raises(UserError, match="rloo"):
        GRPOOptions(model="m", prompts="p", reward_fn="synth", out="x.lora", rloo=True, scale_rewards="batch")


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_each_loss_type_trains_from_the_command_line(loss_type, tmp_path, one_thread):
    import json

    from tinygpt.checkpoint import save_model
    from tinygpt.cli import main
    from tinygpt.config import ModelConfig, pad_vocab
    from tinygpt.model import GPT
    from tinygpt.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
    save_model(tmp_path / "base.tinygpt", m, tok)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                                               + "\n" for i in range(4)))
    out = tmp_path / f"{loss_type}.lora"
    assert main(["grpo", str(tmp_path / "base.tinygpt"), "--prompts", str(tmp_path / "qa.jsonl"), "--reward-fn",
                 "format", "--loss-type", loss_type, "--epsilon-high", "0.28", "--scale-rewards", "batch",
                 "--iterations", "2", "--batch", "2", "--group-size", "2", "--max-new-tokens", "4", "--quiet",
                 "--device", "cpu", "--lora-rank", "2", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (tmp_path / f"{loss_type}.run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["policy_loss"]) for r in rows)
