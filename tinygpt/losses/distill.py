"""Distillation losses: divergences between a student's and a teacher's next-token distributions.

Conventions
-----------
* S is the student, T the teacher. Divergences take NORMALISED log-probabilities over the same
  categories in the last dimension, (N, C), and return one value per position (N,), float32,
  not reduced (the caller sums over positions and divides by its count, as everywhere here).
  The categories are the vocabulary (C = V), or a teacher's k most likely tokens plus ONE bucket
  for the rest of the vocabulary (C = k + 1, `topk_with_rest` and `coarsen`): the top-k loss is
  the divergence between the two distributions coarsened to those k + 1 events, so it is finite
  for every divergence, at most the full one, and equal to it as k grows to V.
* forward KL = KL(T || S) = sum_c p_T (log p_T - log p_S): mass-covering; the classic
  distillation objective (Hinton et al. 2015) and, at temperature 1, the cross-entropy to the
  teacher minus the teacher's entropy. reverse KL = KL(S || T): mode-seeking (MiniLLM).
* `generalized_jsd(beta)` is GKD's (Agarwal et al. 2024) as TRL's GKDTrainer computes it: with
  the mixture M = beta T + (1 - beta) S, JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M).
  The ends are special-cased to the two KLs, as in TRL: beta = 0 IS the forward KL(T || S),
  beta = 1 the reverse KL(S || T); beta = 0.5 is the symmetric Jensen-Shannon divergence. (The
  mixture formula alone tends to 0 at both ends, like beta KL(T || S) as beta -> 0.)
* Temperature tau softens both distributions (logits / tau) before the divergence; the result
  is NOT multiplied by tau^2 (Hinton's gradient-scale correction), as in TRL's GKD. The
  hard-label cross-entropy is taken at temperature 1.
* A category with probability 0 contributes exactly 0: log-probs are floored at -1e4 (exp of
  it is 0 in float32) before use, so 0 * log 0 is never NaN, in the value or in the gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_FLOOR = -1e4


def _f32(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.float()


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_c p_c (log p_c - log q_c) over the last dimension: (..., C) -> (...)."""
    p, q = _f32(p_logp).clamp(min=_LOG_FLOOR), _f32(q_logp).clamp(min=_LOG_FLOOR)
    return (p.exp() * (p - q)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(T || S) per position (N,): what the student misses of the teacher's mass."""
    return kl_divergence(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(S || T) per position (N,): the student's mass where the teacher puts little."""
    return kl_divergence(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence per position (N,) (module docstring): beta = 0
    the forward KL(T || S), beta = 1 the reverse KL(S || T), in between
    beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    s = _f32(student_logp).clamp(min=_LOG_FLOOR)
    t = _f32(teacher_logp).clamp(min=_LOG_FLOOR)
    mix = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))          # (N, C) log M
    return beta * kl_divergence(t, mix) + (1 - beta) * kl_divergence(s, mix)


# ---- the top-k view ------------------------------------------------------------------------------
def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The k most likely tokens of softmax(logits / tau): (log-probs (N, k) float32, normalised
    over the WHOLE vocabulary, so their probabilities sum to at most 1; ids (N, k))."""
    if not 0 < k < logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1] - 1}] (below the vocabulary), got {k}")
    return torch.log_softmax(_f32(logits) / temperature, dim=-1).topk(k, dim=-1)


def topk_with_rest(topk_logp: torch.Tensor) -> torch.Tensor:
    """Teacher side: (N, k) log-probs from `topk_logprobs` -> (N, k + 1), the last category the
    rest of the vocabulary, log(1 - sum p). No gradient flows through it (teacher targets)."""
    lp = _f32(topk_logp).detach()
    rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp(min=1e-30).log()     # (N, 1); rounding never gives log 0
    return torch.cat([lp, rest], dim=-1)


def coarsen(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student side: log-probs (N, k + 1) of softmax(logits / tau) over the tokens `ids` (N, k)
    and the rest of the vocabulary, differentiable. The rest is a logsumexp over the excluded
    tokens (exact; no 1 - sum cancellation)."""
    z = _f32(logits) / temperature                                            # (N, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)                            # (N, 1)
    inside = z.gather(-1, ids) - lse                                          # (N, k)
    rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([inside, rest], dim=-1)


# ---- one chunk of positions ----------------------------------------------------------------------
def distill_token_loss(student_logits: torch.Tensor, targets: torch.Tensor, hard: torch.Tensor,
                       teacher_logits: torch.Tensor | None = None, teacher_topk=None, k: int = 0,
                       beta: float = 0.5, temperature: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """Per-position distillation loss, (3, N): row 0 the loss
        (1 - alpha) * JSD_beta(S_tau || T_tau) + alpha * hard * CE(S_1, target),
    row 1 the divergence and row 2 the cross-entropy (both for logging).

    student_logits (N, V); targets (N,) the data's next tokens; hard (N,) 1 where the target is
    a label to imitate (data responses), 0 where it is not (the student's own samples).
    The teacher is `teacher_logits` (N, V) (the full distribution, or with k > 0 its top-k
    view computed live) or `teacher_topk` = (log-probs (N, k), ids (N, k)) from
    `topk_logprobs` (a cache); with either top-k form both sides are coarsened to k + 1."""
    if teacher_topk is None and k:
        teacher_topk = topk_logprobs(teacher_logits, k, temperature)
    ce = None
    if teacher_topk is not None:
        t_logp, ids = teacher_topk
        s, t = coarsen(student_logits, ids, temperature), topk_with_rest(t_logp)
    else:
        s = torch.log_softmax(_f32(student_logits) / temperature, dim=-1)         # (N, V)
        t = torch.log_softmax(_f32(teacher_logits).detach() / temperature, dim=-1)
        if temperature == 1.0:                 # the CE's log-softmax is this one: no second (N, V) pass
            ce = -s.gather(-1, targets[:, None]).squeeze(-1)
    div = generalized_jsd(s, t, beta)                                             # (N,)
    if ce is None:
        ce = F.cross_entropy(_f32(student_logits), targets, reduction="none")     # (N,)
    loss = (1.0 - alpha) * div + alpha * _f32(hard) * ce
    return torch.stack([loss, div.detach(), ce.detach()])
