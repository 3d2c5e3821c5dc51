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

Training is the `tinygpt reward` stage (`stages/reward.py`); `tinygpt score` prints one reward.
The file records the chat template the model was trained with (`chat_template`); conversations
are rendered with it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .chat import get_template
from .checkpoint import gpt_from_tensors, read_model_file, save_model, split_head
from .data.formats import Message
from .data.pairs import encode_prompt, encode_reply
from .errors import UserError
from .model import packed_mask

HEAD = "reward"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer=None, template=None):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.template = template          # the chat template it was trained with (None: the tokenizer's rule)
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
        """Token ids of prompt (messages or a user text) rendered with the chat template + reply
        (default: the template the reward model was trained with)."""
        msgs = [Message("user", prompt)] if isinstance(prompt, str) else prompt
        tpl = get_template(template or self.template, self.tokenizer)
        return encode_prompt(self.tokenizer, tpl, msgs) + encode_reply(self.tokenizer, tpl, msgs, reply)

    def score_conversation(self, prompt, reply: str, template=None) -> float:
        ids = self.encode_conversation(prompt, reply, template)[-self.config.block_size:]
        return self.score_texts([ids])[0].item()

    # ---- saving ----------------------------------------------------------------------------------
    def state_dict_for_save(self) -> dict:
        return {**self.backbone.state_dict_for_save(), "score.weight": self.score.state_dict()["weight"]}

    def save(self, path, extra: dict | None = None) -> None:
        save_model(path, self, self.tokenizer, {"head": HEAD, **(extra or {})})


def load_reward_model(path, device="cpu") -> RewardModel:
    """A trained reward model from its .tinygpt file, in eval mode, tokenizer at `.tokenizer`,
    the chat template it was trained with at `.template`."""
    tensors, cfg, tok, meta = read_model_file(path)
    if meta.get("head") != HEAD:
        raise UserError("not a reward model (no reward head)", str(path), "train one with 'tinygpt reward'")
    tensors, head = split_head(tensors, meta, cfg, path)
    score = head["score.weight"]
    backbone = gpt_from_tensors(tensors, cfg, path, what="reward model file")
    rm = RewardModel(backbone.to(device), tok, meta.get("chat_template"))
    with torch.no_grad():
        rm.score.weight.copy_(score)
    return rm.to(device).eval()
