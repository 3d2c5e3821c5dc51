"""RL losses and their pieces: masked statistics, KL estimators, GAE, the PPO surrogate and value
loss, group-relative advantages, and the GRPO loss types (re-exported by `tinygpt.losses`).

The GRPO loss types take a minibatch of N sequences in the flat layout of `logprobs.TokenBatch`:
per-token tensors (M,) (log-probs under the current and the sampling policy, advantages) and
`seq` (M,), the sequence 0..N-1 of each token. With the per-token ratio r_it = pi / pi_old, the
advantage A_it (A_i broadcast over sequence i's tokens) and the clipped token objective

    l_it = max(-A_it r_it, -A_it clip(r_it, 1 - eps_low, 1 + eps_high))

they differ in normalisation and in the ratio (`GRPO_LOSS_TYPES`):

  grpo     DeepSeekMath (Shao et al. 2024), the GRPO objective: each sequence's tokens are
           averaged, then the sequences: (1/N) sum_i (1/|o_i|) sum_t l_it. Every completion
           weighs the same, so a token of a long completion weighs less than one of a short one.
  dr_grpo  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the sum over all
           tokens divided by the constant N * L_max (L_max = the generation budget), which
           removes the 1/|o_i| length bias; the paper also drops the std division of the
           advantages (`group_advantages(scale="none")`, the stage's default for this type).
  dapo     DAPO (Yu et al. 2025), the token-level policy-gradient loss: the sum over all tokens
           divided by their number, sum_i sum_t l_it / sum_i |o_i|: every token weighs the same.
           DAPO pairs it with clip-higher (eps_high 0.28 > eps_low 0.2), given separately here.
  gspo     GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its token
           ratios s_i = exp((1/|o_i|) sum_t log r_it), clipped at the sequence level:
           (1/N) sum_i max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)); the paper's
           clip range is small (3e-4, 4e-4) because s_i is a per-token average.

`grpo_policy_loss` returns the minibatch's loss as a mean, the way the papers write it; the
stage hands the engine `loss * units`, `units = loss_units(...)` (tokens for dapo, sequences
otherwise), so the engine's division by the units over micro-batches and ranks gives the same
normalisation over the whole optimizer step.
"""
from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3", "abs", "mse")
REWARD_SCALES = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")

# Importance ratios and k3 are exponentials of log-ratios. Past |20| (a factor of ~5e8)
# the sample is far outside any trust region anyway; clamping keeps exp() finite so that a
# single wild token cannot turn the loss or its gradient into inf/NaN.
_MAX_LOG_RATIO = 20.0


def _f32(x) -> torch.Tensor:
    """Tensor in float32 (numbers and lists welcome); float64 is left alone."""
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.float()


# ------------------------------------------------------------------------- masked stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over all elements or along `dim`; 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the elements of x where mask == 1 (scalar).

    unbiased=True applies Bessel's correction n/(n-1); with n <= 1 it is skipped (the
    variance of a single element is returned as 0 rather than NaN).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1e-8), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) var over masked elements only.

    shift_mean=False adds the mean back (scale only: keeps the sign information of a
    mostly-positive signal). The result is 0 where mask == 0, so padding never leaks into
    a later masked sum.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked tokens (scalar, detached).

    1 means the value head predicts returns perfectly, 0 no better than a constant, < 0
    worse. NaN when the returns have no variance (the quantity is undefined).
    """
    values, returns = _f32(values).detach(), _f32(returns).detach()
    var_r = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_r > 0, 1 - var_res / var_r.clamp(min=1e-12),
                       torch.full_like(var_r, math.nan))


# ---------------------------------------------------------------------------- RL pieces


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With d = logp - ref_logp (same shape, any):
      k1:        d                          unbiased, can be negative per token
      k3:        (exp(-d) - 1) + d          unbiased and >= 0 (Schulman's k3)
      mse / k2:  0.5 * d^2                  biased, >= 0, low variance
      abs:       |d|
    All are exactly 0 where logp == ref_logp. For k3, d is clamped to +-20 so exp stays finite.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl_penalty kind {kind!r}; choose one of {KL_KINDS}")
    d = _f32(logp) - _f32(ref_logp)
    if kind == "k1":
        return d
    if kind == "k3":
        d = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.expm1(-d) + d  # expm1 is exact near d = 0
    if kind == "abs":
        return d.abs()
    return 0.5 * d * d  # mse / k2


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values: (B, T) per-token rewards and value estimates; mask: (B, T) 1 on real
    (response) tokens. Walking backwards over the real tokens only:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t
    where "next" is the next REAL token; after the last real token the episode has ended, so
    V_next = A_next = 0. Masked positions are skipped (their rewards and values are ignored),
    so any padding layout works; put the terminal reward on the last real token.

    Returns (advantages (B, T), returns (B, T)), float32, detached, both 0 where mask == 0.
    """
    rewards, values = _f32(rewards), _f32(values)
    real = mask.bool()  # (B, T)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)  # (B, T)
    next_v = rewards.new_zeros(B)  # (B,) value of the next real token
    next_a = rewards.new_zeros(B)  # (B,) advantage of the next real token
    for t in range(T - 1, -1, -1):
        m = real[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a  # (B,)
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        next_v = torch.where(m, values[:, t], next_v)
        next_a = torch.where(m, a, next_a)
    returns = (adv + values) * real.to(adv.dtype)
    return adv, returns


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2, clip_high: float | None = None):
    """PPO clipped surrogate (Schulman et al. 2017), masked mean over tokens.

    logp: (B, T) log-probs under the current policy (with gradient); old_logp: (B, T) under
    the policy that sampled the tokens; advantages: (B, T); mask: (B, T) 0/1.
        ratio = exp(logp - old_logp)
        loss  = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip_high)))
    clip_high None: the symmetric clip (clip_high = clip); a larger clip_high is DAPO's
    "clip-higher" (Yu et al. 2025), which leaves more room to raise unlikely tokens.

    Returns (loss (), clip_fraction (), approx_kl ()): clip_fraction is the share of tokens
    where the clipped branch was chosen (gradient zero there); approx_kl is the masked mean
    of the k3 estimator (ratio - 1) - log ratio of KL(old || new), >= 0. Metrics detached.
    """
    log_ratio = (_f32(logp) - _f32(old_logp)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B, T)
    per_token, clipped = clipped_surrogate(log_ratio, advantages, clip, clip_high)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_frac = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2,
                      clip_high: float | None = None):
    """The PPO objective per element: max(-A * r, -A * clamp(r, 1 - clip, 1 + clip_high)) with
    r = exp(log_ratio) (any shape; log_ratio already clamped to a finite range). Returns
    (loss (same shape), whether the clipped branch was taken (bool, detached))."""
    ratio = torch.exp(log_ratio)
    adv = _f32(advantages).detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float = 0.2):
    """Clipped value loss: 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)).

    values: (B, T) current value head (with gradient); old_values: (B, T) the values recorded
    at rollout time; returns: (B, T) targets; v_clip = old + clamp(v - old, -clip, +clip).
    Taking the max makes the clip pessimistic: the value head gains nothing from moving
    more than `clip` away from its rollout estimate in one update.

    Returns (loss (), clip_fraction ()), clip_fraction = share of tokens where the clipped
    branch was larger (detached).
    """
    v = _f32(values)
    old = _f32(old_values).detach()
    R = _f32(returns).detach()
    v_clip = old + (v - old).clamp(-clip, clip)  # (B, T)
    err = (v - R) ** 2
    err_clip = (v_clip - R) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clip > err).float(), mask)
    return loss, clip_frac


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     rloo: bool = False, eps: float = 1e-4, scale: str | None = None) -> torch.Tensor:
    """Per-completion advantages from groups of G completions sampled for the same prompt.

    rewards: (N,) with N = P * G, laid out as consecutive groups (prompt 0's G completions,
    then prompt 1's, ...). With mean over the group and std unbiased (as in GRPO):
      GRPO (rloo=False): (r - group mean) / (std + eps), where `scale` picks the std:
                         "group" the group's own (Shao et al. 2024), "batch" that of all N
                         rewards (more robust when a group is nearly uniform; TRL's
                         scale_rewards="batch"), "none" no division (Dr. GRPO, Liu et al. 2025:
                         the std division over-weights easy and hopeless prompts).
                         scale None: "group" if normalize_std else "none".
      RLOO (rloo=True):  r - mean of the OTHER G-1 rewards = G/(G-1) * (r - mean);
                         normalize_std and scale are ignored (the raw leave-one-out baseline).
    A group whose rewards are all equal gets advantage 0 everywhere.

    Returns (N,) float32, detached.
    """
    G = int(group_size)
    r = _f32(rewards).reshape(-1)
    if G < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if r.numel() % G != 0:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {G}")
    scale = scale or ("group" if normalize_std else "none")
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {scale!r}; choose one of {REWARD_SCALES}")
    g = r.view(-1, G)  # (P, G)
    centred = g - g.mean(dim=1, keepdim=True)  # (P, G)
    if rloo:
        adv = centred * (G / (G - 1))
    elif scale == "group":
        adv = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centred / (r.std() + eps)
    else:
        adv = centred
    return adv.reshape(-1)


# ---------------------------------------------------------------------- GRPO loss types


def _check(loss_type: str) -> None:
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")


def per_sequence_mean(x: torch.Tensor, seq: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """(M,) per-token values -> (N,) the mean over each sequence's tokens (0 for a sequence without any)."""
    x = _f32(x)
    total = x.new_zeros(n_seqs).index_add(0, seq, x)                         # (N,)
    count = torch.bincount(seq, minlength=n_seqs).clamp(min=1).to(x.dtype)   # (N,)
    return total / count


def aggregate_tokens(x: torch.Tensor, seq: torch.Tensor, n_seqs: int, loss_type: str = "dapo",
                     max_len: int | None = None) -> torch.Tensor:
    """A per-token quantity (M,) reduced as `loss_type` reduces its loss (module docstring):
    dapo the token mean; grpo and gspo the mean of per-sequence means; dr_grpo the sum over
    N * max_len. The stages reduce the KL-to-reference term with it too, as TRL does."""
    _check(loss_type)
    if loss_type == "dapo":
        return _f32(x).mean()
    if loss_type == "dr_grpo":
        if not max_len:
            raise ValueError("dr_grpo needs max_len (the generation budget L_max)")
        return _f32(x).sum() / (n_seqs * max_len)
    return per_sequence_mean(x, seq, n_seqs).mean()


def loss_units(loss_type: str, n_tokens: int, n_seqs: int) -> int:
    """What a minibatch's loss is a mean over: its tokens (dapo) or its sequences (the others)."""
    _check(loss_type)
    return n_tokens if loss_type == "dapo" else n_seqs


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, seq: torch.Tensor,
                     n_seqs: int, loss_type: str = "dapo", eps_low: float = 0.2, eps_high: float | None = None,
                     max_len: int | None = None):
    """The clipped policy loss of one minibatch (module docstring for each `loss_type`).

    logp (M,) with gradient; old_logp (M,) of the sampling policy; advantages (M,) (constant
    within a sequence); seq (M,) sequence ids in [0, n_seqs); eps_high None: = eps_low.
    Returns (loss (), clip_fraction (), approx_kl ()): the share of tokens (gspo: sequences)
    whose clipped branch was taken, and the token mean of the k3 estimate of KL(old || new)."""
    _check(loss_type)
    eps_high = eps_low if eps_high is None else eps_high
    if loss_type == "dapo":       # the token mean: exactly the PPO surrogate over the minibatch's tokens
        return ppo_policy_loss(logp, old_logp, advantages, torch.ones_like(_f32(logp)), eps_low, eps_high)
    log_ratio = (_f32(logp) - _f32(old_logp)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)   # (M,)
    with torch.no_grad():
        approx_kl = (torch.expm1(log_ratio) - log_ratio).mean()
    if loss_type == "gspo":
        log_s = per_sequence_mean(log_ratio, seq, n_seqs)                    # (N,) log s_i
        adv = per_sequence_mean(_f32(advantages).detach(), seq, n_seqs)      # (N,) A_i
        per_seq, clipped = clipped_surrogate(log_s, adv, eps_low, eps_high)
        return per_seq.mean(), clipped.float().mean(), approx_kl
    per_token, clipped = clipped_surrogate(log_ratio, advantages, eps_low, eps_high)     # (M,)
    return aggregate_tokens(per_token, seq, n_seqs, loss_type, max_len), clipped.float().mean(), approx_kl
