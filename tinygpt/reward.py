"""Reward models: a GPT backbone with a scalar head, trained on preference pairs (Bradley-Terry).

Contract (what PPO and `tinygpt score` rely on):
- `load_reward_model(path, device="cpu") -> RewardModel`, in eval mode, its tokenizer at
  `.tokenizer`. `RewardModel.forward(idx, mask_or_lengths) -> rewards (B,)` float32:
  idx (B, T) token ids; mask_or_lengths either (B,) lengths of right-padded rows, or a (B, T)
  0/1 mask of real tokens (left OR right padding). The reward is the head applied to the final
  hidden state of each row's LAST real token. With a mask, positions count real tokens only and
  padding is invisible to attention, so a left-padded row scores exactly like the same row alone.
- Texts to score end where the policy's reply ends: for chat data, prompt rendered with the chat
  template + reply + end-of-turn marker (`score_conversation` does exactly that).
- `score_texts(list of token-id lists) -> (N,)` scores unpadded sequences (no gradient).

File format: a `.tinygpt` file like any model (backbone weights, config, tokenizer) plus the
tensor `score.weight` (1, n_embd) and the metadata `"head": "reward"`. Plain `load_model` refuses
it (sampling from a reward model is meaningless); `load_reward_model` refuses files without it.

Training: the backbone (base + any `--lora` adapters merged in) is fully fine-tuned with the head,
as in the classic recipe (lr 1e-5, one epoch). Chosen and rejected of all pairs of a batch go
through ONE packed forward; the loss is -log sigmoid(r_chosen - r_rejected); pairwise accuracy on
a held-out split (`--val-split`, default 0.05) is the number to watch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import read_model_file, save_model
from .errors import UserError
from .losses import bradley_terry_loss
from .preference import ItemBatches

HEAD = "reward"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer=None):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.config = backbone.config
        w = backbone.lm_head.weight
        self.score = nn.Linear(self.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx, mask_or_lengths=None, *, pos=None, attn_mask=None, ends=None):
        """Rewards (B,) at each row's last real token; or, for packed rows, at the flat
        positions `ends` (N,) into B*T (with `pos` and `attn_mask` describing the packing)."""
        B, T = idx.shape
        if ends is None:
            m = mask_or_lengths
            if m is None:
                m = torch.full((B,), T, device=idx.device)
            if m.dim() == 1:                                     # lengths, right padding
                ends = torch.arange(B, device=idx.device) * T + m.long() - 1
            else:                                                # (B, T) mask, any padding side
                from .model import packed_mask
                real = m.bool()
                pos = (real.long().cumsum(1) - 1).clamp(min=0)
                doc = torch.where(real, 0, -1 - torch.arange(T, device=idx.device))  # pads: alone
                attn_mask = packed_mask(doc)
                last = T - 1 - real.flip(1).long().argmax(1)        # (B,) last real position
                ends = torch.arange(B, device=idx.device) * T + last
        h = self.backbone.hidden(idx, pos=pos, mask=attn_mask)        # (B, T, C)
        h = h.reshape(-1, h.shape[-1]).index_select(0, ends)          # (N, C)
        return self.score(h).squeeze(-1).float()                      # (N,)

    @torch.no_grad()
    def score_texts(self, seqs: list[list[int]]) -> torch.Tensor:
        """Rewards (N,) of token-id sequences (right-padded into one batch)."""
        dev = self.score.weight.device
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id is not None else 0
        idx = torch.full((len(seqs), T), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return self(idx.to(dev), torch.tensor([len(s) for s in seqs], device=dev))

    def encode_conversation(self, prompt, reply: str, template=None) -> list[int]:
        """Token ids of prompt (messages or a user text) rendered with the chat template + reply."""
        from .chat import get_template
        from .data.formats import Message
        from .preference import encode_prompt, encode_reply
        msgs = [Message("user", prompt)] if isinstance(prompt, str) else prompt
        tpl = get_template(template, self.tokenizer)
        return encode_prompt(self.tokenizer, tpl, msgs) + encode_reply(self.tokenizer, tpl, msgs, reply)

    def score_conversation(self, prompt, reply: str, template=None) -> float:
        ids = self.encode_conversation(prompt, reply, template)[-self.config.block_size:]
        return self.score_texts([ids])[0].item()

    # ---- saving ----------------------------------------------------------------------------------
    def state_dict_for_save(self) -> dict:
        return {**self.backbone.state_dict_for_save(), "score.weight": self.score.weight}

    def save(self, path) -> None:
        save_model(path, self, self.tokenizer, {"head": HEAD})


def load_reward_model(path, device="cpu") -> RewardModel:
    """A trained reward model from its .tinygpt file, in eval mode, tokenizer at `.tokenizer`."""
    from .checkpoint import gpt_from_tensors
    tensors, cfg, tok, meta = read_model_file(path)
    if meta.get("head") != HEAD or "score.weight" not in tensors:
        raise UserError("not a reward model (no reward head)", str(path), "train one with 'tinygpt reward'")
    score = tensors.pop("score.weight")
    backbone = gpt_from_tensors(tensors, cfg, path, what="reward model file")
    rm = RewardModel(backbone.to(device), tok)
    with torch.no_grad():
        rm.score.weight.copy_(score)
    return rm.to(device).eval()


# ---- training ---------------------------------------------------------------------------------
def reward_loss_step(model, batch):
    """Bradley-Terry loss summed over the batch's pairs; count = pairs."""
    (tb,), ids = batch
    B = len(ids)
    r = model(tb.idx, pos=tb.pos, attn_mask=tb.attn_mask(), ends=tb.ends)    # (2B,)
    rc, rr = r[:B], r[B:]
    loss = bradley_terry_loss(rc, rr)                                      # (B,)
    rc, rr = rc.detach(), rr.detach()
    return loss.sum(), B, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                           "rewards/margin": (rc - rr).mean(), "rewards/accuracy": (rc > rr).float().mean(),
                           "tokens": tb.n_tokens}


class RewardModelTrainer:
    """Trains a RewardModel on tokenized pairs [(prompt, chosen, rejected)] with the engine."""

    def __init__(self, model: RewardModel, items, tcfg, out, val_items=(), device=None, rank: int = 0,
                 world: int = 1, log=print, pack: bool = True):
        self.model, self.tcfg, self.out, self.log = model, tcfg, Path(out), log
        self.device = device or next(model.parameters()).device
        self.val_items, self.pack, self.rank = list(val_items), pack, rank
        model.to(self.device).requires_grad_(True)
        self.pad = (model.tokenizer.pad_id if model.tokenizer is not None else None) or 0
        self.batches = ItemBatches(items, "pair", tcfg.batch, tcfg.seed, self.device, self.pad, pack, None, rank, world)
        if tcfg.compile:   # compile the blocks; the step itself has data-dependent Python
            for block in model.backbone.model.layers:
                block.compile()
            tcfg.compile = False
        tcfg.resume_key = {**tcfg.resume_key, "stage": "reward", "batch": tcfg.batch, "accum": tcfg.accum,
                           "world": world, "pairs": len(items)}
        val_fn = (lambda m: self.evaluate()) if self.val_items else None
        from .train.engine import Engine
        self.engine = Engine(model, tcfg, reward_loss_step, self.batches, out, self.save, val_fn, self.device,
                             rank, world, log)

    @torch.no_grad()
    def evaluate(self, items=None) -> dict:
        """Held-out pairwise accuracy and mean Bradley-Terry loss."""
        items = self.val_items if items is None else items
        evals = ItemBatches(items, "pair", self.tcfg.batch, 0, self.device, self.pad, self.pack)
        was = self.model.training
        self.model.eval()
        loss = correct = 0.0
        with self.engine.autocast():
            for batch in evals.fixed():
                l, B, m = reward_loss_step(self.model, batch)
                loss += l.item()
                correct += m["rewards/accuracy"].item() * B
        self.model.train(was)
        return {"val_loss": loss / len(items), "val_accuracy": correct / len(items)}

    def save(self, final: bool) -> None:
        self.model.save(self.out)

    def fit(self) -> dict:
        last = self.engine.fit()
        if self.rank == 0:
            self.log(f"saved {self.out}")
        return last


@dataclass
class RewardArgs:
    model: str
    data: str
    out: str
    lora: tuple = ()
    template: str | None = None
    format: str | None = None
    skip_bad_rows: bool = False
    max_length: int = 1024
    max_prompt_length: int = 512
    val_split: float = 0.05
    epochs: float | None = None
    device: str = "auto"
    grad_checkpointing: bool = False


def train_reward(args: RewardArgs, tcfg, log=print) -> dict:
    """Load model + pairs, train a reward model, write args.out; returns the last metrics
    (with val_accuracy when a held-out split exists)."""
    from .data.formats import load_preferences
    from .lora import merge_and_unload
    from .preference import load_stage, prepare_template, split_items, steps_for_epochs, tokenize_pairs
    device, rank, world, gpt, tok = load_stage(args)
    merge_and_unload(gpt)
    template, added = prepare_template(tok, args.template, allow_new_tokens=True)
    if added:
        gpt.resize_token_embeddings(max(tok.vocab_size, gpt.config.vocab_size))
    max_length = min(args.max_length, gpt.config.block_size)
    records, skipped = load_preferences(args.data, args.format, args.skip_bad_rows)
    items, dropped = tokenize_pairs(records, tok, template, max_length, min(args.max_prompt_length, max_length - 1))
    log(f"{len(items)} pairs from {args.data} ({skipped} rows skipped, {dropped} identical after truncation)")
    train, val = split_items(items, args.val_split, tcfg.seed)
    if tcfg.steps == 0:
        tcfg.steps = steps_for_epochs(args.epochs or 1.0, len(train), tcfg.batch, tcfg.accum, world)
    if val and not tcfg.val_every:
        tcfg.val_every = tcfg.steps                    # at least once, at the end
    torch.manual_seed(tcfg.seed)
    rm = RewardModel(gpt, tok)
    return RewardModelTrainer(rm, train, tcfg, args.out, val, device, rank, world, log).fit()


def score_text(model_path, text: str, prompt: str | None = None, template=None, device: str = "auto") -> float:
    """The reward of `text` (raw), or of the reply `text` to the user prompt `prompt` rendered
    with the chat template."""
    from .train.engine import setup_device
    dev, _, _ = setup_device(device)
    rm = load_reward_model(model_path, dev)
    if prompt is None:
        ids = rm.tokenizer.encode(text)
        if not ids:
            raise UserError("--text is empty")
        return rm.score_texts([ids[-rm.config.block_size:]])[0].item()
    return rm.score_conversation(prompt, text, template)
