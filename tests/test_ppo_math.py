"""PPO math against hand-computed small cases (numbers worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from hcx_megatron.rlhf import ppo_math as pm

pytestmark = pytest.mark.timeout(30)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_full_mask_hand_computed():
    # gamma=1, lam=0.5, rewards [0,0,1], values [.5,.4,.3]:
    # d2 = 1 - .3 = .7 -> A2 = .7 ; d1 = .3 - .4 = -.1 -> A1 = -.1 + .5*.7 = .25 ; d0 = .4 - .5 -> A0 = -.1 + .125
    adv, ret = pm.gae(t([0, 0, 1]), t([0.5, 0.4, 0.3]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.025, 0.25, 0.7]))
    assert torch.allclose(ret, t([0.525, 0.65, 1.0]))


def test_gae_ignores_prompt_and_padding_positions():
    # Response is positions 1..2; values/rewards outside must not leak in (the 9s and 5s).
    # d2 = 1 + .9*0 - .4 = .6 ; d1 = 0 + .9*.4 - .5 = -.14 ; A1 = -.14 + .9*.95*.6 = .373
    adv, ret = pm.gae(t([5, 0, 1, 5]), t([9, 0.5, 0.4, 9]), t([0, 1, 1, 0]), gamma=0.9, lam=0.95)
    assert torch.allclose(adv, t([0, 0.373, 0.6, 0]))
    assert torch.allclose(ret, t([0, 0.873, 1.0, 0]))


def test_gae_lambda_one_gamma_one_is_monte_carlo():
    r = t([0.1, -0.2, 0.3, 1.0])
    v = t([0.7, 0.1, -0.4, 0.2])
    adv, ret = pm.gae(r, v, torch.ones_like(r), 1.0, 1.0)
    mc = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
    assert torch.allclose(ret, mc)
    assert torch.allclose(adv, mc - v)


def test_whitening_hand_computed():
    out = pm.masked_whiten(t([1, 2, 3, 4]), t([1, 1, 1, 1]), eps=0.0)
    s = math.sqrt(1.25)  # var of 1..4 = 1.25
    assert torch.allclose(out, t([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]))
    # Masked: entries 1,3,5 -> mean 3, var 8/3; the 100 is ignored and zeroed.
    out = pm.masked_whiten(t([1, 3, 100, 5]), t([1, 1, 0, 1]), eps=0.0)
    assert torch.allclose(out, t([-2 / math.sqrt(8 / 3), 0, 0, 2 / math.sqrt(8 / 3)]))
    kept = pm.masked_whiten(t([1, 3, 100, 5]), t([1, 1, 0, 1]), shift_mean=False, eps=0.0)
    assert torch.allclose(kept, t([3 - 2 / math.sqrt(8 / 3), 3, 0, 3 + 2 / math.sqrt(8 / 3)]))


def test_kl_estimators():
    logp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    assert torch.allclose(pm.kl_estimate(logp, ref, "k1"), t([math.log(2)]))
    # k3 with r = ref/pi = 0.5: (0.5 - 1) - log 0.5
    assert torch.allclose(pm.kl_estimate(logp, ref, "k3"), t([-0.5 + math.log(2)]))
    with pytest.raises(ValueError, match="k2"):
        pm.kl_estimate(logp, ref, "k2")


def test_token_rewards_kl_penalty_and_score_on_last_token():
    # kl = [0, .5, -1] on the response (positions 1,2); coef .1 -> [-, -.05, +.1]; score 2 on position 2.
    rewards, kl = pm.token_rewards(t(2.0).view(1), t([0, -1, -2]), t([0, -1.5, -1]), t([0, 1, 1]), 0.1)
    assert torch.allclose(kl, t([0, 0.5, -1.0]))
    assert torch.allclose(rewards, t([0, -0.05, 2.1]))
    assert pm.last_token_index(torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])).tolist() == [2, -1]


def test_clipped_policy_loss_four_quadrants():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(t([1.5, 1.5, 0.5, 0.5]))  # ratios
    adv = t([1.0, -1.0, 1.0, -1.0])
    terms = pm.clipped_policy_loss(logp, old, adv, torch.ones_like(adv), clip=0.2)
    # r=1.5,A=+1: max(-1.5,-1.2) = -1.2 (clipped) | r=1.5,A=-1: max(1.5,1.2) = 1.5
    # r=0.5,A=+1: max(-.5,-.8) = -.5             | r=0.5,A=-1: max(.5,.8) = .8 (clipped)
    assert torch.allclose(terms.loss, t([-1.2, 1.5, -0.5, 0.8]))
    assert terms.clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert torch.allclose(terms.approx_kl, 0.5 * logp ** 2)


def test_clipped_policy_loss_gradient_zero_when_clipped():
    logp = torch.log(t([1.5, 1.5])).requires_grad_()
    terms = pm.clipped_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t([1.0, -1.0]),
                                   t([1, 1]), clip=0.2)
    terms.loss.sum().backward()
    # clipped branch: constant; unclipped with A=-1: d(ratio)/dlogp = ratio = 1.5
    assert torch.allclose(logp.grad, t([0.0, 1.5]))


def test_clipped_value_loss():
    # V=1, old=.5, R=2, eps=.2: clip(V)=.7 -> max(1, 1.69)/2 = .845 (clipped)
    # V=1, old=.9: clip(V)=1 -> .5 (not clipped)
    loss, clipped = pm.clipped_value_loss(t([1.0, 1.0]), t([0.5, 0.9]), t([2.0, 2.0]), t([1, 1]), 0.2)
    assert torch.allclose(loss, t([0.845, 0.5]))
    assert clipped.tolist() == [[1.0, 0.0]]


def test_unlikelihood_and_repetition():
    ul = pm.unlikelihood_loss(torch.log(t([0.75, 0.75])), t([1, 0]))
    assert torch.allclose(ul, t([-math.log(0.25), 0.0]))
    # bigrams of 1 2 1 2 1: (1,2) (2,1) (1,2)* (2,1)* -> positions 3 and 4 repeat; rate 2/4
    assert pm.repeated_ngram_positions([1, 2, 1, 2, 1], 2) == [False, False, False, True, True]
    assert pm.repetition_rate([1, 2, 1, 2, 1], 2) == 0.5
    assert pm.repetition_rate([1, 2, 3, 4], 2) == 0.0
    assert pm.repetition_rate([7], 2) == 0.0
    assert pm.repetition_rate([7, 7, 7, 7], 1) == 0.75


def test_adaptive_kl_controller():
    c = pm.KLController(value=0.1, adaptive=True, target=1.0, horizon=10)
    c.update(current_kl=2.0, n_steps=5)  # error clipped to .2 -> x(1 + .2*5/10)
    assert c.value == pytest.approx(0.11)
    c.update(current_kl=0.9, n_steps=10)  # error -.1 -> x .9
    assert c.value == pytest.approx(0.099)
    fixed = pm.KLController(value=0.04)
    fixed.update(100.0, 10)
    assert fixed.value == 0.04
