"""Losses on cases small enough to work by hand, plus autograd checks on random tensors."""

import math

import pytest
import torch

from npr.train.losses import dapo_loss, papo_loss, sft_loss, token_logprobs

LN3 = math.log(3.0)


def _logits_three_quarters() -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence of 3 tokens over a vocab of 2 where each predicted token gets probability 3/4."""
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [0.0, 0.0]]])  # [1, 3, 2]
    token_ids = torch.tensor([[0, 1, 0]])  # logits[0] pick 1 (3/4), logits[1] pick 0 (3/4)
    return logits, token_ids


def test_token_logprobs_shift_by_hand():
    logits, token_ids = _logits_three_quarters()
    out = token_logprobs(logits, token_ids)
    # token 0 has no predictor; tokens 1 and 2 are predicted by logits 0 and 1 with p = 3/4
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.75), math.log(0.75)]]))


def test_token_logprobs_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    token_ids = torch.randint(0, 11, (3, 7))
    expected = -torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), token_ids[:, 1:].reshape(-1), reduction="none"
    ).view(3, 6)
    torch.testing.assert_close(token_logprobs(logits, token_ids)[:, 1:], expected)


def test_token_logprobs_bf16_logits_are_scored_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9)
    token_ids = torch.randint(0, 9, (2, 5))
    out = token_logprobs(logits.bfloat16(), token_ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, token_logprobs(logits.bfloat16().float(), token_ids))


def test_token_logprobs_predictor_gathers_from_the_parent():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4)
    token_ids = torch.tensor([[0, 1, 2, 3, 1]])
    # Token 3 (first token of a second branch) is predicted by position 1 (its parent), not by 2.
    predictor = torch.tensor([[0, 0, 1, 1, 3]])
    out = token_logprobs(logits, token_ids, predictor)
    expected_3 = torch.log_softmax(logits[0, 1], -1)[3]
    torch.testing.assert_close(out[0, 3], expected_3)
    torch.testing.assert_close(out[0, :3], token_logprobs(logits, token_ids)[0, :3])


def test_token_logprobs_rejects_a_predictor_that_looks_ahead():
    logits = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="predictor"):
        token_logprobs(logits, torch.tensor([[0, 1, 0]]), predictor=torch.tensor([[0, 0, 2]]))


def test_sft_loss_by_hand_and_split_batches_add_up():
    logits, token_ids = _logits_three_quarters()
    mask = torch.tensor([[False, True, True]])
    torch.testing.assert_close(sft_loss(logits, token_ids, mask), torch.tensor(-math.log(0.75)))

    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    mask = torch.rand(4, 6) > 0.4
    mask[:, 0] = False
    mask[:, 1] = True
    whole = sft_loss(logits, labels, mask)
    total = mask.sum()
    halves = sft_loss(logits[:2], labels[:2], mask[:2], num_tokens=total) + sft_loss(
        logits[2:], labels[2:], mask[2:], num_tokens=total
    )
    torch.testing.assert_close(halves, whole)


def test_papo_loss_value_and_gradient_by_hand():
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.3, -0.7]], requires_grad=True)
    advantages = torch.tensor([1.0, -4.0])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    loss = papo_loss(logprobs, advantages, mask)
    # ratio is 1 everywhere: loss = -(1 + 1 - 4) / 3 tokens
    torch.testing.assert_close(loss, torch.tensor(2.0 / 3.0))
    loss.backward()
    # d loss / d logp[b, t] = -Â_b · mask[b, t] / 3
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 4 / 3, 0.0]]))


def _tiny_policy(seed: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    policy = torch.nn.Linear(8, 13)
    hidden = torch.randn(4, 6, 8)  # [B, T, H]
    token_ids = torch.randint(0, 13, (4, 6))  # [B, T]
    mask = torch.rand(4, 6) > 0.3  # [B, T]
    mask[:, 0] = False
    mask[:, 1] = True
    return policy, hidden, token_ids, mask


@pytest.mark.parametrize("per_token", [False, True])
def test_papo_gradient_equals_reinforce(per_token):
    policy, hidden, token_ids, mask = _tiny_policy(1)
    advantages = torch.randn(4, 6) if per_token else torch.randn(4)

    def grads(loss_of_logprobs):
        policy.zero_grad()
        loss_of_logprobs(token_logprobs(policy(hidden), token_ids)).backward()
        return [p.grad.clone() for p in policy.parameters()]

    papo = grads(lambda logp: papo_loss(logp, advantages, mask))
    adv = advantages if per_token else advantages[:, None]
    # REINFORCE, by hand: -Σ Â · logp over response tokens / Σ|y|
    reinforce = grads(lambda logp: -(adv * logp * mask).sum() / mask.sum())
    for got, want in zip(papo, reinforce, strict=True):
        torch.testing.assert_close(got, want)
    assert any(g.abs().sum() > 0 for g in papo)


def test_papo_value_is_minus_token_mean_advantage():
    policy, hidden, token_ids, mask = _tiny_policy(2)
    advantages = torch.randn(4)
    loss = papo_loss(token_logprobs(policy(hidden), token_ids), advantages, mask)
    per_token = advantages[:, None].expand(4, 6)[mask]
    torch.testing.assert_close(loss, -per_token.mean())


def _dapo_case(advantage: float):
    """Three tokens with ratios 1.5, 1.1, 0.5 against ε_low 0.2, ε_high 0.28."""
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = (old + torch.log(torch.tensor([[1.5, 1.1, 0.5]]))).requires_grad_()
    out = dapo_loss(logprobs, old, torch.tensor([advantage]), torch.ones(1, 3))
    out.loss.backward()
    return out, logprobs.grad


def test_dapo_positive_advantage_clips_above_one_plus_eps_high():
    out, grad = _dapo_case(+1.0)
    # min(rÂ, clip(r)Â) = [min(1.5, 1.28), 1.1, min(0.5, 0.8)] = [1.28, 1.1, 0.5]
    torch.testing.assert_close(out.loss, torch.tensor(-(1.28 + 1.1 + 0.5) / 3))
    # d(rÂ)/dlogp = rÂ; the clipped token (r 1.5 > 1.28) gets none; r 0.5 < 0.8 is not clipped for Â > 0
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.1 / 3, -0.5 / 3]]))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(1 / 3))


def test_dapo_negative_advantage_clips_below_one_minus_eps_low():
    out, grad = _dapo_case(-1.0)
    # [min(-1.5, -1.28), -1.1, min(-0.5, -0.8)] = [-1.5, -1.1, -0.8]
    torch.testing.assert_close(out.loss, torch.tensor((1.5 + 1.1 + 0.8) / 3))
    # the clipped token (r 0.5 < 0.8) gets none; r 1.5 > 1.28 is not clipped for Â < 0
    torch.testing.assert_close(grad, torch.tensor([[1.5 / 3, 1.1 / 3, 0.0]]))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(1 / 3))


def test_dapo_without_clip_lets_every_token_through():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = (old + torch.log(torch.tensor([[1.5, 1.1, 0.5]]))).requires_grad_()
    out = dapo_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 3), clip=False)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.5 / 3, -1.1 / 3, -0.5 / 3]]))
    assert out.clip_fraction == 0


@pytest.mark.parametrize("clip", [True, False])
def test_dapo_on_policy_equals_papo(clip):
    """With old = current log-probs the ratio is 1, inside the clip range: DAPO's update is PAPO's."""
    policy, hidden, token_ids, mask = _tiny_policy(3)
    advantages = torch.randn(4)
    logp = token_logprobs(policy(hidden), token_ids)
    dapo = dapo_loss(logp, logp.detach(), advantages, mask, clip=clip).loss
    papo = papo_loss(logp, advantages, mask)
    torch.testing.assert_close(dapo, papo)
    dapo_grad = torch.autograd.grad(dapo, list(policy.parameters()), retain_graph=True)
    papo_grad = torch.autograd.grad(papo, list(policy.parameters()))
    for got, want in zip(dapo_grad, papo_grad, strict=True):
        torch.testing.assert_close(got, want)


def test_losses_reject_bad_shapes_and_empty_masks():
    logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        papo_loss(logprobs, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask must be"):
        papo_loss(logprobs, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one token"):
        dapo_loss(logprobs, logprobs, torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
