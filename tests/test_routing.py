"""The routing specification, one property per test."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe import (
    ModelConfig,
    MoE,
    SwiGLU,
    expert_capacity,
    load_balancing_loss,
    moe_reference,
    plan_dispatch,
    route,
    router_z_loss,
)

E, K = 16, 2


def random_logits(T=64, E=E):
    return torch.randn(T, E) * 2


def test_gates_sum_to_one():
    r = route(random_logits(), K)
    torch.testing.assert_close(r.gates_TK.sum(-1), torch.ones(64))
    assert (r.gates_TK > 0).all()


def test_top_one_gates_are_the_chosen_probabilities_and_train_the_router():
    logits = random_logits().requires_grad_()
    r = route(logits, 1)  # Switch: renormalised, one gate would be exactly 1 and carry no gradient
    torch.testing.assert_close(r.gates_TK, logits.softmax(-1).max(-1, keepdim=True).values)
    assert (r.gates_TK < 1).all()
    layer = moe_layer(top_k=1)
    layer(torch.randn(64, 32)).y.square().mean().backward()  # the task loss alone
    assert layer.router.weight.grad.abs().sum() > 0


def test_exactly_k_distinct_experts_per_token_and_they_are_the_top_k():
    logits = random_logits()
    r = route(logits, K)
    assert r.experts_TK.shape == (64, K)
    assert all(len(set(row.tolist())) == K for row in r.experts_TK)
    probs = logits.softmax(-1)
    kth_best = probs.sort(dim=-1, descending=True).values[:, K - 1 : K]
    chosen = probs.gather(-1, r.experts_TK)
    assert (chosen >= kth_best).all()
    # the gates are the chosen probabilities renormalised, best first
    torch.testing.assert_close(r.gates_TK, chosen / chosen.sum(-1, keepdim=True))
    assert (r.gates_TK[:, 0] >= r.gates_TK[:, 1]).all()


def test_router_math_runs_in_fp32():
    r = route(random_logits().bfloat16(), K)
    assert r.probs_TE.dtype == r.gates_TK.dtype == r.logits_TE.dtype == torch.float32


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balanced_router_gives_balance_loss_one(k):
    # Uniform probabilities: P_i = 1/E, whatever top-k picks among the ties.
    uniform = torch.zeros(64, E)
    assert load_balancing_loss(*_probs_and_experts(uniform, k)).item() == pytest.approx(1.0)
    # A non-uniform but balanced router: token t prefers expert t mod E, every expert equally often.
    cyclic = torch.stack([torch.roll(torch.linspace(3, 0, E), t) for t in range(4 * E)])
    loss = load_balancing_loss(*_probs_and_experts(cyclic, k))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_collapsed_router_gives_the_maximum_e_over_k(k):
    collapsed = torch.zeros(64, E)
    collapsed[:, 0] = 50.0  # every token puts all its probability on expert 0
    assert load_balancing_loss(*_probs_and_experts(collapsed, k)).item() == pytest.approx(E / k, rel=1e-5)
    for _ in range(5):  # and nothing scores above it
        assert load_balancing_loss(*_probs_and_experts(random_logits() * 5, k)).item() <= E / k + 1e-5


def test_balance_loss_matches_the_switch_formula_by_hand():
    logits = random_logits(T=8, E=4)
    probs, experts = _probs_and_experts(logits, 2)
    f = torch.tensor([(experts == i).sum().item() / (8 * 2) for i in range(4)])
    P = probs.mean(0)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(4 * (f * P).sum().item(), rel=1e-6)


def test_balance_loss_gradient_flows_through_probabilities_only():
    logits = random_logits().requires_grad_()
    load_balancing_loss(*_probs_and_experts(logits, K)).backward()
    assert logits.grad.abs().sum() > 0


def test_padding_tokens_are_excluded_from_both_losses():
    logits = random_logits(T=10)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    probs, experts = _probs_and_experts(logits, K)
    torch.testing.assert_close(load_balancing_loss(probs, experts, mask),
                               load_balancing_loss(probs[mask], experts[mask]))
    torch.testing.assert_close(router_z_loss(logits, mask), router_z_loss(logits[mask]))


def test_z_loss_on_a_hand_computed_input():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log(1 + 1) = log 2, log(3 + 1) = log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_capacity_is_ceil_of_k_tokens_over_experts_times_factor():
    assert expert_capacity(n_tokens=100, k=2, n_experts=16, factor=1.0) == 13  # ceil(12.5)
    assert expert_capacity(n_tokens=2048, k=2, n_experts=16, factor=1.25) == 320


def test_dispatch_groups_assignments_by_expert_first_choices_first():
    experts = torch.tensor([[1, 0], [0, 2], [1, 2]])  # (T=3, K=2)
    plan = plan_dispatch(experts, n_experts=4)
    assert plan.counts_E.tolist() == [2, 2, 2, 0]
    # slot-major positions: slot s of token t is s * T + t
    order = plan.order_A.tolist()
    assert [experts.t().reshape(-1)[i].item() for i in order] == [0, 0, 1, 1, 2, 2]
    assert order == [1, 3, 0, 2, 4, 5]  # expert 0: token 1's 1st choice before token 0's 2nd
    assert plan.tokens_A.tolist() == [1, 0, 0, 2, 1, 2]
    assert plan.dropped.item() == 0


# ---- the MoE layer: fast path against the loop-over-experts reference -------------------------

def moe_layer(**overrides) -> MoE:
    cfg = ModelConfig(**{"d_model": 32, "d_ff": 48, "n_heads": 4, "n_experts": 8, "top_k": 2, **overrides})
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def fixed_router(layer: MoE, logits_TE: torch.Tensor) -> None:
    """Swap in fixed router logits whose gradient still reaches the router weight and the input."""

    def router_logits(x):
        learned = F.linear(x, layer.router.weight)
        return logits_TE + (learned - learned.detach())  # value: fixed; gradient: the router's

    layer.router_logits = router_logits


def grads_of(layer: MoE, x: torch.Tensor, impl: str):
    layer.experts.impl = impl
    for t in [x, *layer.parameters()]:
        t.grad = None
    out = layer(x)
    (out.y * torch.linspace(-1, 1, out.y.numel()).view_as(out.y)).sum().backward()
    return out, [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("impl", ["split", "grouped_mm"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_fast_dispatch_equals_the_reference_loop_in_outputs_and_gradients(impl, dispatch):
    layer = moe_layer(dispatch=dispatch, capacity_factor=1.0)
    T = 40
    logits = torch.randn(T, 8)
    logits[:, [2, 5]] = -1e4  # experts 2 and 5 receive no tokens at all
    logits[:30, 0] = 10.0  # expert 0 overflows its capacity
    fixed_router(layer, logits)
    x = torch.randn(T, 32, requires_grad=True)
    ref, ref_grads = grads_of(layer, x, "loop")
    fast, fast_grads = grads_of(layer, x, impl)
    torch.testing.assert_close(fast.y, ref.y)
    assert fast.stats.tokens_per_expert[[2, 5]].tolist() == [0, 0]
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    grads = dict(zip(names, fast_grads))
    assert grads["experts.w1"][[2, 5]].abs().sum() == 0 and grads["experts.w1"][0].abs().sum() > 0
    assert grads["router.weight"].abs().sum() > 0  # the gates' gradient reached the router


def test_fast_dispatch_equals_reference_with_a_learned_router():
    layer = moe_layer()
    x = torch.randn(3, 16, 32, requires_grad=True)  # (B, T, D) in, same shape out
    ref, ref_grads = grads_of(layer, x, "loop")
    fast, fast_grads = grads_of(layer, x, "auto")
    assert fast.y.shape == x.shape
    torch.testing.assert_close(fast.y, ref.y)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref)


def test_one_expert_top_one_equals_a_dense_swiglu_ffn():
    layer = moe_layer(n_experts=1, top_k=1)
    dense = SwiGLU(32, 48)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0].t())
        dense.w3.weight.copy_(layer.experts.w3[0].t())
        dense.w2.weight.copy_(layer.experts.w2[0].t())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(layer(x).y, dense(x))


def test_capacity_mode_drops_exactly_the_overflow_and_counts_it():
    layer = moe_layer(dispatch="capacity", capacity_factor=1.0)
    T = 16
    capacity = expert_capacity(T, 2, 8, 1.0)  # ceil(2 * 16 / 8) = 4
    logits = torch.full((T, 8), -10.0)
    logits[:, 0] = 5.0  # every token's first choice: expert 0
    logits[:, 1] = 4.0  # every token's second choice: expert 1
    logits[12:, 1] = 6.0  # ... except the last 4, whose first choice is expert 1
    fixed_router(layer, logits)
    x = torch.randn(T, 32)
    out = layer(x)
    assert out.stats.tokens_per_expert[:2].tolist() == [16, 16]
    assert out.stats.dropped.item() == 2 * (16 - capacity)
    # Expert 1 keeps first choices before second choices: tokens 12..15 (1st), none of 0..11.
    # Expert 0 keeps the first 4 first choices: tokens 0..3. Tokens 4..11 lost both experts.
    assert out.y[4:12].abs().sum() == 0
    r = route(logits, 2)
    e = layer.experts
    expert = lambda i, rows: (F.silu(x[rows] @ e.w1[i]) * (x[rows] @ e.w3[i])) @ e.w2[i]
    torch.testing.assert_close(out.y[:4], r.gates_TK[:4, :1] * expert(0, slice(0, 4)))
    torch.testing.assert_close(out.y[12:], r.gates_TK[12:, :1] * expert(1, slice(12, 16)))
    torch.testing.assert_close(out.y, moe_reference(x, r, e, capacity))


def test_dropless_mode_never_drops():
    layer = moe_layer()
    logits = torch.full((32, 8), -10.0)
    logits[:, 0] = 5.0
    fixed_router(layer, logits)
    assert layer(torch.randn(32, 32)).stats.dropped.item() == 0


def test_router_gets_gradient_from_the_task_loss_alone():
    layer = moe_layer()
    x = torch.randn(64, 32)
    out = layer(x)
    out.y.square().mean().backward()  # no auxiliary loss in this objective
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_jitter_only_in_training():
    layer = moe_layer(router_jitter=0.1)
    x = torch.randn(16, 32)
    layer.eval()
    torch.testing.assert_close(layer.router_logits(x), layer.router_logits(x))
    layer.train()
    assert not torch.equal(layer.router_logits(x), layer.router_logits(x))


def _probs_and_experts(logits, k):
    r = route(logits, k)
    return r.probs_TE, r.experts_TK
