"""Loss functions for every training stage, written over plain tensors.

Nothing here touches a model, a tokenizer or a file: each function takes tensors of
log-probabilities, rewards or values and returns tensors. Keeping the maths apart from the
training loops means each formula can be checked against hand-computed numbers. This module
holds the token-level and preference losses; `losses.rl` the RL pieces and the GRPO loss types,
`losses.distill` the student-teacher divergences. All of them are importable from here.

Conventions
-----------
* Arithmetic is done in float32. Inputs in bf16/fp16 are upcast first, because the
  differences of log-probs that these losses are built on lose most of their digits in
  half precision.
* Sequence-level preference losses (`dpo_loss`, `simpo_loss`, `orpo_loss`) take per-example
  SUMMED log-probs of shape (B,) and return a triple
  ``(loss_per_example (B,), chosen_rewards (B,), rejected_rewards (B,))``.
  The rewards are detached and only meant for logging (reward accuracy, margins).
  The loss is NOT reduced: the caller sums it and divides by whatever count it wants
  (examples in the whole accumulated batch, say), so gradient accumulation stays exact.
* `bradley_terry_loss` returns only the per-example loss (B,): its "rewards" are its inputs.
* `kto_loss` returns ``(loss_per_example (B,), rewards (B,), z0 ())``.
* Token-level RL losses (`ppo_policy_loss`, `ppo_value_loss`, `grpo_policy_loss`) take per-token
  tensors plus a 0/1 mask (or the sequence of each token) and return a scalar mean followed by
  detached scalar metrics.
* Advantages and returns (`gae`, `group_advantages`, `masked_whiten`) are targets, not
  things to differentiate through; `gae` and `group_advantages` return detached tensors.
* Router losses of a mixture of experts (`load_balance_loss`, `router_z_loss`) take the
  router's float32 probabilities or logits (N tokens, E experts) and return a scalar mean.
* Distillation divergences take normalised log-probs (N, C) and return (N,) (`losses.distill`).
* `head_cross_entropy` (`losses.head`) takes hidden states and the head's weight instead of
  logits: the head and its summed cross-entropy chunk by chunk, gradients formed in forward.
* Bad option strings raise ValueError naming the allowed choices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distill import (  # re-exported: `tinygpt.losses` is the one place losses live
    coarsen,
    distill_token_loss,
    forward_kl,
    generalized_jsd,
    kl_divergence,
    reverse_kl,
    topk_logprobs,
    topk_with_rest,
)
from .head import head_cross_entropy
from .rl import (
    GRPO_LOSS_TYPES,
    KL_KINDS,
    REWARD_SCALES,
    aggregate_tokens,
    clipped_surrogate,
    explained_variance,
    gae,
    group_advantages,
    grpo_policy_loss,
    kl_penalty,
    loss_units,
    masked_mean,
    masked_var,
    masked_whiten,
    per_sequence_mean,
    ppo_policy_loss,
    ppo_value_loss,
)

__all__ = [
    "token_cross_entropy", "token_logprobs", "entropy_from_logits", "bradley_terry_loss", "dpo_loss",
    "DPO_LOSS_TYPES", "simpo_loss", "orpo_loss", "kto_loss", "load_balance_loss", "router_z_loss",
    # losses.rl
    "kl_penalty", "KL_KINDS", "REWARD_SCALES", "gae", "masked_mean", "masked_var", "masked_whiten",
    "explained_variance", "ppo_policy_loss", "clipped_surrogate", "ppo_value_loss", "group_advantages",
    "GRPO_LOSS_TYPES", "per_sequence_mean", "aggregate_tokens", "loss_units", "grpo_policy_loss",
    # losses.distill
    "kl_divergence", "forward_kl", "reverse_kl", "generalized_jsd", "topk_logprobs", "topk_with_rest", "coarsen",
    "distill_token_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# ORPO's odds need log(1 - p) with p = exp(avg logp). Per-token float32 log-probs carry
# about 1e-7 of rounding noise, so an average closer to 0 than 1e-6 carries no signal;
# capping it there keeps log(1 - p) finite and its gradient (~1/|x|) below ~1e6.
_ORPO_MAX_AVG_LOGP = -1e-6


def _f32(x) -> torch.Tensor:
    """Tensor in float32 (numbers and lists welcome); float64 is left alone."""
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.float()


def _check_smoothing(label_smoothing: float, strict: bool) -> None:
    hi_ok = label_smoothing < 0.5 if strict else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and hi_ok):
        bound = "[0, 0.5)" if strict else "[0, 0.5]"
        raise ValueError(f"label_smoothing must be in {bound}, got {label_smoothing}")


# --------------------------------------------------------------------------- token level


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy  sum_t -log softmax(logits_t)[targets_t]  over kept targets.

    logits: (..., V) of any float dtype; targets: (...) integer ids, `ignore_index` marks
    positions that do not count (prompt tokens, padding). The softmax is taken in float32.

    reduction:
      "sum"  (default) -> scalar sum over kept targets. Summing (rather than averaging) lets
             the caller divide by the token count of the whole accumulated batch.
      "mean" -> scalar mean over kept targets (0/0 gives NaN, as in torch).
      "none" -> per-position loss shaped like `targets`, 0 at ignored positions.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be one of 'sum', 'mean', 'none', got {reduction!r}")
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """Per-token log p(target) = log softmax(logits)[target], float32, shaped like `targets`.

    logits: (..., V); targets: (...). Positions with target == ignore_index give 0, so
    ``token_logprobs(...).sum(-1)`` is directly the summed log-prob of the kept tokens.

    Computed as -cross_entropy(reduction="none"): exact, and the only (N, V) float32 tensor
    is the one autograd saves inside cross_entropy, no second log_softmax copy to gather from
    (with bf16 logits the float32 upcast is transient). Chunk over positions to go lower.
    """
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1),
                          ignore_index=ignore_index, reduction="none")  # (N,)
    return -nll.view(targets.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) at each position, float32.

    logits: (..., V) -> (...). -inf logits (banned tokens) are replaced by the float32 minimum,
    so their p*log p is exactly 0 instead of 0 * -inf = NaN, in the value and in the gradient.
    The caller can chunk over positions if (..., V) float32 copies do not fit.
    """
    z = logits.float().clamp(min=torch.finfo(torch.float32).min)  # (..., V)
    logp = F.log_softmax(z, dim=-1)  # (..., V)
    return -(logp.exp() * logp).sum(-1)  # (...)


# --------------------------------------------------------------------- preference losses


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin=None) -> torch.Tensor:
    """Reward-model pairwise loss  -log sigmoid(r_c - r_r - margin),  per example (B,).

    r_chosen, r_rejected: (B,) scalar rewards. margin: None, a float, or (B,) — the
    Llama-2 style margin demanding a larger gap for pairs rated more clearly apart.
    """
    diff = _f32(r_chosen) - _f32(r_rejected)  # (B,)
    if margin is not None:
        diff = diff - _f32(margin).to(diff.device)
    return -F.logsigmoid(diff)  # (B,)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             len_c=None, len_r=None):
    """Direct preference optimisation and its variants over summed log-probs (B,).

    pi_* / ref_* are SUMMED response log-probs under the policy / frozen reference.
    With h = (pi_c - ref_c) - (pi_r - ref_r) and ls = label_smoothing:

      sigmoid: -(1-ls) log s(beta h) - ls log s(-beta h)   (Rafailov et al. 2023; ls > 0 is
               "conservative DPO", which assumes labels are flipped with probability ls)
      ipo:     (h' - 1/(2 beta))^2 with h' built from length-normalised log-ratios,
               h' = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r   (Azar et al. 2023);
               len_c, len_r (response token counts, (B,) or numbers) are required.
      hinge:   relu(1 - beta h)   (SLiC-style)
      robust:  ((1-ls)(-log s(beta h)) - ls(-log s(-beta h))) / (1 - 2 ls)
               (Chowdhury et al. 2024): unbiased under label noise of rate ls < 0.5.
    where s is the logistic sigmoid. label_smoothing is used by sigmoid and robust only.

    Returns (loss (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards being the
    implicit rewards beta*(pi_c - ref_c) and beta*(pi_r - ref_r), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    ratio_c = _f32(pi_c) - _f32(ref_c)  # (B,) log pi/ref of chosen
    ratio_r = _f32(pi_r) - _f32(ref_r)  # (B,)
    h = ratio_c - ratio_r  # (B,)
    ls = float(label_smoothing)

    if loss_type == "sigmoid":
        _check_smoothing(ls, strict=False)
        loss = -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        _check_smoothing(ls, strict=True)
        loss = ((1 - ls) * -F.logsigmoid(beta * h) - ls * -F.logsigmoid(-beta * h)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    else:  # ipo
        if len_c is None or len_r is None:
            raise ValueError("dpo_loss(loss_type='ipo') needs len_c and len_r (response lengths)")
        n_c = _f32(len_c).to(h.device).clamp(min=1)  # (B,) or ()
        n_r = _f32(len_r).to(h.device).clamp(min=1)
        h_norm = ratio_c / n_c - ratio_r / n_r  # (B,)
        loss = (h_norm - 1 / (2 * beta)) ** 2

    return loss, (beta * ratio_c).detach(), (beta * ratio_r).detach()


def simpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, len_c, len_r, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): reference-free, length-normalised preference loss.

    With z = beta * (pi_c/len_c - pi_r/len_r) - gamma  and ls = label_smoothing:
        loss = -(1-ls) log s(z) - ls log s(-z)
    pi_c, pi_r: (B,) SUMMED response log-probs under the policy; len_c, len_r: (B,) or
    numbers, response token counts. gamma is the absolute target reward margin, as written
    in the paper (a "gamma/beta ratio" g corresponds to gamma = g * beta).

    Returns (loss (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards being
    beta * (average per-token log-prob), detached.
    """
    _check_smoothing(float(label_smoothing), strict=False)
    pi_c = _f32(pi_c)
    avg_c = pi_c / _f32(len_c).to(pi_c.device).clamp(min=1)  # (B,)
    avg_r = _f32(pi_r) / _f32(len_r).to(pi_c.device).clamp(min=1)  # (B,)
    z = beta * (avg_c - avg_r) - gamma  # (B,)
    ls = float(label_smoothing)
    loss = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    return loss, (beta * avg_c).detach(), (beta * avg_r).detach()


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp), finite for avg_logp in (-inf, 0].

    log(1 - p) is taken as log(-expm1(x)): exact near x = 0, where log1p(-exp(x)) would
    round exp(x) to 1 and give -inf. For very negative x it is ~0 as it should be.
    """
    x = avg_logp.clamp(max=_ORPO_MAX_AVG_LOGP)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, len_c, len_r, nll_c=None,
              lam: float = 0.1):
    """ORPO (Hong et al. 2024): SFT loss plus an odds-ratio preference penalty.

        loss = nll_c + lam * -log s(log_odds(avg_c) - log_odds(avg_r))
        log_odds(x) = x - log(1 - exp(x)),   avg_* = pi_* / len_*   (mean per-token log-prob)

    pi_c, pi_r: (B,) SUMMED response log-probs under the policy; len_c, len_r: (B,) or numbers.
    nll_c: (B,) the per-example SFT term, expected to be the MEAN per-token negative
    log-likelihood of the chosen response (with gradient); None uses -pi_c / len_c.
    Averages near 0 are handled stably (see `_log_odds`).

    Returns (loss (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards being
    lam * avg log-prob (the usual ORPO logging convention), detached.
    """
    pi_c = _f32(pi_c)
    avg_c = pi_c / _f32(len_c).to(pi_c.device).clamp(min=1)  # (B,)
    avg_r = _f32(pi_r) / _f32(len_r).to(pi_c.device).clamp(min=1)  # (B,)
    if nll_c is None:
        nll_c = -avg_c
    odds_term = -F.logsigmoid(_log_odds(avg_c) - _log_odds(avg_r))  # (B,)
    loss = _f32(nll_c) + lam * odds_term
    return loss, (lam * avg_c).detach(), (lam * avg_r).detach()


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl_pi: torch.Tensor,
             kl_ref: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024): preference loss from unpaired good/bad completions.

    pi, ref: (B,) SUMMED completion log-probs under policy / reference; desirable: (B,) bool.
    kl_pi, kl_ref: (M,) summed log-probs of MISMATCHED prompt/completion pairs (each prompt
    paired with another example's completion) under policy / reference. The reference point

        z0 = clamp(mean(kl_pi - kl_ref), min=0), detached

    estimates KL(pi || ref); it is a baseline, never a path for gradients. With
    r = pi - ref:
        desirable:   w_d * (1 - s(beta * (r - z0)))
        undesirable: w_u * (1 - s(beta * (z0 - r)))
    Under data parallelism the caller should average kl_pi - kl_ref across ranks first.

    Returns (loss (B,), rewards (B,) = beta * r detached, z0 () detached).
    """
    r = _f32(pi) - _f32(ref)  # (B,)
    z0 = (_f32(kl_pi) - _f32(kl_ref)).mean().clamp(min=0).detach()  # ()
    desirable = torch.as_tensor(desirable, device=r.device).bool()  # (B,)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))  # (B,)
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))  # (B,)
    loss = torch.where(desirable, good, bad)
    return loss, (beta * r).detach(), z0


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss, for top-k routing: E * sum_e f_e * P_e, where f_e
    is the fraction of the N*k token-to-expert assignments that went to expert e (not
    differentiable: it only weighs) and P_e the mean router probability of e. 1 when both are
    uniform, E when every token goes to one expert with probability 1 (k = 1).
    probs (N, E) softmax probabilities; topk_idx (N, k) chosen experts."""
    probs = _f32(probs)
    n_experts = probs.shape[-1]
    counts = torch.zeros(n_experts, device=probs.device).scatter_add_(
        0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), device=probs.device))      # (E,)
    f = counts / topk_idx.numel()
    return n_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, which keeps the router's
    logits small (large ones make the softmax, and the routing, unstable). logits (N, E)."""
    return torch.logsumexp(_f32(logits), dim=-1).square().mean()
