"""PPO / RLHF math as small pure functions on tensors (no processes, no models), so tests can check them
against hand-computed cases.

Conventions (shared by every function here and by rlhf/ppo.py):
- Tensors are [batch, T] where position t is the action "emit token t+1 of the sequence" (label-aligned: the
  logits at position t predict token t+1). `mask[b, t] = 1` where that token belongs to the response.
- Responses are contiguous, so the masked positions of a row form one run; the last masked position is the
  last response token, where the sequence-level score is paid.
- Log-probabilities are natural-log, at the sampling temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------------
# masked statistics and whitening
# ---------------------------------------------------------------------------------------------------------
def masked_sum_count(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(x.dtype)
    return (x * m).sum(), m.sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s, n = masked_sum_count(x, mask)
    return s / n.clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over masked entries; with `group`, over the entries of every rank in it
    (all-reduce of sum, sum of squares and count), so whitening is the same for any data-parallel size."""
    m = mask.to(torch.float64)
    xs = x.to(torch.float64)
    stats = torch.stack([(xs * m).sum(), (xs * xs * m).sum(), m.sum()])
    if group is not None and dist.is_initialized():
        dist.all_reduce(stats, group=group)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; entries outside the mask become 0.
    shift_mean=False keeps the mean (only rescales), as some PPO variants do for rewards."""
    mean, var = masked_moments(x, mask, group)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# KL and per-token rewards
# ---------------------------------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of the sampled token.
    k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with r = ref/pi (unbiased, >= 0)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked position of each row (rows with an empty mask give -1)."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), t, torch.full_like(t, -1)).max(dim=1).values


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * KL_t on response tokens, plus the sequence score on the last response token.
    Returns (rewards [B, T], per-token KL [B, T] masked)."""
    m = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, kl_kind) * m
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).view(-1)
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) positions of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last response token = 0 (episode ends);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V), both 0 outside the mask."""
    m = mask.to(values.dtype)
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mt
        # Outside the response the recursion restarts: the next in-response step sees V=0, A=0 after the end.
        next_adv = a * mt
        next_value = values[:, t] * mt
    returns = (adv + values) * m
    return adv, returns


# ---------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PolicyLossTerms:
    loss: torch.Tensor  # per-token loss [B, T] (masked)
    clipped: torch.Tensor  # per-token 1.0 where the clipped branch was taken (masked)
    approx_kl: torch.Tensor  # per-token 0.5 * (log ratio)^2 (masked), a KL(old || new) estimate


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float) -> PolicyLossTerms:
    """PPO-clip: max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)) per token."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    took_clip = (clipped > unclipped).to(logp.dtype)
    return PolicyLossTerms(loss * m, took_clip * m, 0.5 * log_ratio.detach() ** 2 * m)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) per token; returns (loss, clipped)."""
    m = mask.to(values.dtype)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a = (values - returns) ** 2
    b = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(a, b)
    return loss * m, (b > a).to(values.dtype) * m


def unlikelihood_loss(logp: torch.Tensor, negative_mask: torch.Tensor, min_prob_gap: float = 1e-6) -> torch.Tensor:
    """Sequence-level unlikelihood (Welleck et al. 2019): -log(1 - p(y_t)) on tokens marked negative
    (here: tokens that repeat an earlier n-gram of the same response). Per-token, masked."""
    p = torch.exp(logp)
    return -torch.log((1.0 - p).clamp(min=min_prob_gap)) * negative_mask.to(logp.dtype)


# ---------------------------------------------------------------------------------------------------------
# repetition
# ---------------------------------------------------------------------------------------------------------
def repeated_ngram_positions(tokens: list[int], n: int) -> list[bool]:
    """For each token: does it complete an n-gram that already occurred earlier in `tokens`?"""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    seen: set[tuple[int, ...]] = set()
    out = [False] * len(tokens)
    for end in range(n - 1, len(tokens)):
        gram = tuple(tokens[end - n + 1: end + 1])
        if gram in seen:
            out[end] = True
        else:
            seen.add(gram)
    return out


def repetition_rate(tokens: list[int], n: int) -> float:
    """Share of a response's n-grams that repeat an earlier one (0 = no repetition; 0 for < n tokens)."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    return sum(repeated_ngram_positions(tokens, n)) / total


# ---------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------
@dataclass
class KLController:
    """Fixed coefficient (adaptive=False) or Ziegler et al. (2019)'s adaptive controller:
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    value: float = 0.04
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive or not math.isfinite(current_kl):
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "adaptive": self.adaptive, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


__all__ = [
    "masked_mean", "masked_sum_count", "masked_moments", "masked_whiten", "kl_estimate", "token_rewards",
    "last_token_index", "gae", "PolicyLossTerms", "clipped_policy_loss", "clipped_value_loss",
    "unlikelihood_loss", "repeated_ngram_positions", "repetition_rate", "KLController",
]
