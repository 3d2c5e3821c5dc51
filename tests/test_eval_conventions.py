"""Evaluation that compares with lm-evaluation-harness: the document prefix (recorded in the model
and reproduced by the exported tokenizer), HellaSwag cleaning, TruthfulQA MC1/MC2 and the
harmlessness rate by hand, standard errors, truncation reports, --log-samples, --limit."""
import json
import math

import pytest
import torch

from tinygpt.checkpoint import save_model
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.eval import choice, harness
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer

from test_eval import Bigram, ids, lp_text  # the crafted models


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def test_hellaswag_rows_are_cleaned_as_lm_eval_does(tmp_path):
    rows = [{"activity_label": "Making tea", "ctx_a": "A man boils water.", "ctx_b": "then he POURS it",
             "endings": ["into a cup [step] slowly.", " onto  the floor.", "[header] nowhere", "x [title] y"],
             "label": "0"},
            {"activity_label": "Baking", "ctx": "She mixes [substeps] the flour.", "endings": ["a", "b"], "label": 1}]
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = choice.load_hellaswag(path)
    # ctx_b.capitalize() lowers the rest; bracketed tags are dropped, ' [title]' ends a sentence
    assert first.contexts[0] == "Making tea: A man boils water. Then he pours it"
    assert first.continuations == [" into a cup slowly.", " onto the floor.", " nowhere", " x. y"]
    assert second.contexts[0] == "Baking: She mixes the flour." and second.gold == 1
    assert first.norm_lengths() == [len("into a cup slowly."), len("onto the floor."), len("nowhere"), len("x. y")]


def test_contexts_start_with_the_recorded_document_prefix(tok):
    """A Bigram model: log p(first context char | prefix) is part of nothing scored, but the first
    continuation token's context is the prefix when the context is one token; so a prefix of EOS
    vs BOS changes the score exactly as computed by hand."""
    V = tok.vocab_size
    eos, bos = tok.eos_id, tok.bos_id
    table = torch.zeros(V, V)
    table[eos, ids(tok, "a")[0]] = 3.0
    m = Bigram(table)
    item = choice.ChoiceItem([""], ["a"], 0)        # empty context: the continuation follows the prefix
    for prefix, prev in (("<|endoftext|>", eos), ("<|bos|>", bos)):
        t = Tokenizer.from_json(tok.to_json(), json.dumps({"eos": tok.eos, "bos": tok.bos, "doc_prefix": prefix}))
        lps, _ = choice.item_loglikelihoods(m, t, [item])
        want = float(torch.log_softmax(table[prev], -1)[ids(tok, "a")[0]])
        assert lps[0][0] == pytest.approx(want, abs=1e-6)
    # files written before the prefix was recorded keep scoring after EOS
    old = Tokenizer.from_json(tok.to_json(), json.dumps({"eos": tok.eos, "bos": tok.bos}))
    assert old.doc_prefix == tok.eos and old.prefix_ids() == [eos]


def test_exported_tokenizer_adds_the_prefix_and_lm_eval_style_scoring_agrees(tmp_path, tok):
    """lm-evaluation-harness with add_bos_token=True encodes context and context+continuation with
    the tokenizer's special tokens; on our exported model that gives our log-likelihoods."""
    transformers = pytest.importorskip("transformers")
    from tinygpt.commands.files import export_model
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), mlp="swiglu", qk_norm=False,
                                      tie_embeddings=True))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    save_model(tmp_path / "m.tinygpt", model, tok)
    export_model(tmp_path / "m.tinygpt", tmp_path / "hf", "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_tok("cats sit")["input_ids"] == tok.prefix_ids() + tok.encode("cats sit")
    assert hf_tok("cats sit", add_special_tokens=False)["input_ids"] == tok.encode("cats sit")
    items = [choice.ChoiceItem(["Question: where?\nAnswer:"] * 2, [" here", " there"], 0),
             choice.ChoiceItem(["The sky is"] * 3, [" blue", " green", " loud"], 0)]
    ours, _ = choice.item_loglikelihoods(model, tok, items)
    for it, lps in zip(items, ours):
        for ctx, cont, lp in zip(it.contexts, it.continuations, lps):
            whole = hf_tok(ctx + cont)["input_ids"]              # lm-eval's _encode_pair
            n_ctx = len(hf_tok(ctx)["input_ids"])
            with torch.no_grad():   # over the tokenizer's vocabulary (the padded rows are never real tokens)
                logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0, :, :tok.vocab_size].float(), -1)
            ref = sum(float(logp[j - 1, whole[j]]) for j in range(n_ctx, len(whole)))
            assert lp == pytest.approx(ref, abs=1e-4)


def _truthful_file(tmp_path):
    rows = [{"question": "Is the sky green?",
             "mc1_targets": {"choices": ["No.", "Yes.", "Maybe."], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": ["No.", "Not at all.", "Yes."], "labels": [1, 1, 0]}},
            {"question": "Do cats bark?",
             "mc1_targets": {"choices": ["No, they meow.", "Yes."], "labels": [1, 0]},
             "mc2_targets": {"choices": ["No.", "Yes.", "Always."], "labels": [1, 0, 0]}}]
    path = tmp_path / "tqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_truthfulqa_mc1_and_mc2_by_hand(tmp_path, tok):
    V = tok.vocab_size
    Y = ids(tok, "Y")[0]
    table = torch.zeros(V, V)
    table[ids(tok, " ")[0], Y] = 2.0         # after the joining space, "Y" is likelier than "N"
    m = Bigram(table)
    items = choice.load_truthfulqa(_truthful_file(tmp_path), primer="Q: a?\nA: b.")
    assert items[0].context == "Q: a?\nA: b.\n\nQ: Is the sky green?\nA:"
    res = choice.score_truthfulqa(m, tok, items, samples=True)

    def ll(text):
        return lp_text(m, tok, ":", " " + text)
    # MC1: the true answer must win; item 1: "No." vs "Yes." vs "Maybe."
    mc1 = [float(max(["No.", "Yes.", "Maybe."], key=ll) == "No."),
           float(max(["No, they meow.", "Yes."], key=ll) == "No, they meow.")]

    def mass(trues, falses):
        p = [math.exp(ll(x)) for x in trues + falses]
        return sum(p[:len(trues)]) / sum(p)
    mc2 = [mass(["No.", "Not at all."], ["Yes."]), mass(["No."], ["Yes.", "Always."])]
    assert res["mc1"] == pytest.approx(sum(mc1) / 2) and res["mc2"] == pytest.approx(sum(mc2) / 2, rel=1e-6)
    assert res["mc2_stderr"] == pytest.approx(abs(mc2[0] - mc2[1]) / 2, abs=1e-6)   # n = 2: |a - b| / 2
    assert [s["mc2"] for s in res["samples"]] == pytest.approx(mc2, rel=1e-6) and res["n"] == 2


def _nano(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=64))
    save_model(tmp_path / "m.tinygpt", model, tok)
    return tmp_path / "m.tinygpt"


def test_log_samples_truncation_and_limit_through_the_harness(tmp_path, tok):
    path = _nano(tmp_path, tok)
    rows = [{"query": "Q" * (70 if i == 0 else 5) + "?", "choices": ["yes", "no"], "gold": i % 2} for i in range(4)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text.txt").write_text("\n\n".join(f"document number {i} is here" for i in range(6)))
    lines = []
    res = harness.evaluate(path, "arc,ppl,truthfulqa", data=[f"arc={tmp_path / 'arc.jsonl'}",
                           f"ppl={tmp_path / 'text.txt'}", f"truthfulqa={_truthful_file(tmp_path)}"],
                           limit=3, device="cpu", log_samples=True, log=lines.append)["tasks"]
    arc = res["arc"]
    assert arc["n"] == 3 and len(arc["samples"]) == 3 and arc["truncated"] == 1
    assert arc["samples"][0]["truncated"] and not arc["samples"][1]["truncated"]
    assert {"acc_stderr", "acc_norm_stderr"} <= set(arc)
    assert any("1 of 3 items did not fit" in ln for ln in lines)
    assert res["ppl"]["n"] == 3                                  # --limit: the first 3 documents
    assert res["truthfulqa"]["n"] == 2 and len(res["truthfulqa"]["samples"]) == 2


def test_harmless_rate_with_a_fixed_judge(tmp_path, tok, monkeypatch):
    from tinygpt.reward_model import RewardModel
    path = _nano(tmp_path, tok)
    from tinygpt.checkpoint import load_model
    backbone, _, _ = load_model(path)
    RewardModel(backbone, tok).save(tmp_path / "rm.tinygpt")
    pairs = [{"prompt": f"Tell me how to do thing {i}.", "chosen": "I can't help with that.",
              "rejected": f"Sure: harm {i}"} for i in range(4)]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    rewards = {f"Sure: harm {i}": float(i) for i in range(4)}     # rejected replies score 0, 1, 2, 3

    def judge(rm, prompts, answers, batch=8):
        return [rewards.get(a, 1.5) for a in answers]            # any reply of the model scores 1.5
    monkeypatch.setattr(harness, "reward_scores", judge)
    res = harness.evaluate(path, "harmless", data=str(tmp_path / "hh.jsonl"), judge=str(tmp_path / "rm.tinygpt"),
                           device="cpu", max_new_tokens=4, log=lambda *a: None)["tasks"]["harmless"]
    assert res["harmless_rate"] == 0.5 and res["n"] == 4          # 1.5 beats 0 and 1, loses to 2 and 3
    assert res["harmless_rate_stderr"] == pytest.approx((0.5 * 0.5 / 3) ** 0.5)
    assert res["reward"] == 1.5 and res["reward_rejected"] == 1.5
    with pytest.raises(Exception, match="needs --judge"):
        harness.evaluate(path, "harmless", data=str(tmp_path / "hh.jsonl"), device="cpu", log=lambda *a: None)
