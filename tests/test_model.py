"""The transformer around the routing: attention variants, causality, accounting, presets."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe import MoE, MoETransformer, SwiGLU, load_config
from moe.model.attention import apply_rope, one_token_attention, rope_tables
from moe.model.kv_cache import KVCache

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tokens(cfg, B=2, T=16):
    return torch.randint(0, cfg.vocab_size, (B, T))


def test_forward_returns_logits_loss_and_its_parts(tiny):
    model = MoETransformer(tiny)
    x = tokens(tiny)
    out = model(x)
    assert out.logits.shape == (2, 16, tiny.vocab_size)
    assert out.loss is None and out.ce_loss is None and out.balance_loss is None and out.z_loss is None
    out = model(x, x)
    expected_ce = F.cross_entropy(out.logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(out.ce_loss, expected_ce)
    torch.testing.assert_close(out.loss, out.ce_loss + tiny.aux_loss_coef * out.balance_loss
                               + tiny.z_loss_coef * out.z_loss)
    assert len(out.router_stats) == tiny.n_layers
    for stats in out.router_stats:
        assert stats.tokens_per_expert.sum().item() == 2 * 16 * tiny.top_k
        assert stats.dropped.item() == 0


def test_targets_of_minus_100_are_ignored(tiny):
    model = MoETransformer(tiny)
    x = tokens(tiny)
    targets = x.clone()
    targets[:, :8] = -100
    out = model(x, targets)
    expected = F.cross_entropy(out.logits[:, 8:].flatten(0, 1), x[:, 8:].flatten())
    torch.testing.assert_close(out.ce_loss, expected)


def test_mqa_equals_mha_whose_kv_heads_are_copies(tiny):
    mqa = MoETransformer(replace(tiny, n_kv_heads=1)).eval()
    mha = MoETransformer(replace(tiny, n_kv_heads=tiny.n_heads)).eval()
    state = mqa.state_dict()
    for name, value in state.items():
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):  # (1 * Dh, D) -> (H * Dh, D)
            state[name] = value.repeat(tiny.n_heads, 1)
    mha.load_state_dict(state)
    x = tokens(tiny)
    torch.testing.assert_close(mqa(x).logits, mha(x).logits)
    kv = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.endswith(("wk.weight", "wv.weight")))
    assert kv(mha) == tiny.n_heads * kv(mqa)


def test_gqa_builds_and_runs(tiny):
    model = MoETransformer(replace(tiny, n_kv_heads=2))
    assert model.blocks[0].attn.wk.weight.shape == (2 * tiny.head_dim, tiny.d_model)
    assert model(tokens(tiny)).logits.isfinite().all()


@pytest.mark.parametrize("kv_heads", [1, 2, 8])  # multi-query, grouped, multi-head
def test_the_compiled_decode_steps_attention_is_sdpas(kv_heads):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, kv_heads, 10, 16), torch.randn(3, kv_heads, 10, 16)
    mask = torch.arange(10) <= torch.tensor([0, 4, 9])[:, None, None, None]  # (B, 1, 1, X): rows at 3 positions
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(one_token_attention(q, k, v, mask), want)


def test_causal_mask_a_future_token_never_changes_an_earlier_logit(tiny):
    model = MoETransformer(tiny).eval()
    x = tokens(tiny, B=1, T=20)
    changed = x.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % tiny.vocab_size
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_tables_are_computed_once_kept_out_of_the_state_dict_and_rebuilt_on_load(tiny):
    model = MoETransformer(replace(tiny, rope_scale=2.0)).eval()
    cos, sin = rope_tables(torch.arange(tiny.max_seq_len), tiny.head_dim, tiny.rope_theta, 2.0)
    torch.testing.assert_close((model.rope_cos, model.rope_sin), (cos, sin), rtol=0, atol=0)
    assert not any(key.startswith("rope_") for key in model.state_dict())  # checkpoints stay as they were
    loaded = MoETransformer.from_state_dict(model.cfg, model.state_dict())  # built on meta, then assigned
    assert loaded.rope_cos.device.type == "cpu"
    x = tokens(tiny, B=1, T=12)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_rope_scale_is_position_interpolation():
    pos = torch.arange(8)
    cos2, sin2 = rope_tables(pos * 2, head_dim=16, theta=10000.0, scale=2.0)
    cos1, sin1 = rope_tables(pos, head_dim=16, theta=10000.0, scale=1.0)
    torch.testing.assert_close((cos2, sin2), (cos1, sin1))


def test_rope_is_a_rotation_that_preserves_norms_and_relative_positions():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    score = lambda m, n: (apply_rope(q, *rope_tables(torch.tensor([m]), 16, 100.0))
                          * apply_rope(k, *rope_tables(torch.tensor([n]), 16, 100.0))).sum()
    torch.testing.assert_close(score(5, 3), score(12, 10))  # depends on m - n only
    rotated = apply_rope(q, *rope_tables(torch.tensor([7]), 16, 100.0))
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_moe_every_interleaves_dense_and_moe_layers(tiny):
    model = MoETransformer(replace(tiny, n_layers=4, moe_every=2))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [SwiGLU, MoE, SwiGLU, MoE]
    assert len(model(tokens(tiny), tokens(tiny)).router_stats) == 2


def test_one_expert_top_one_model_is_dense(tiny):
    model = MoETransformer(replace(tiny, n_experts=1, top_k=1))
    assert all(isinstance(b.ffn, SwiGLU) for b in model.blocks)
    counts = model.param_counts()
    assert counts.active == counts.total and counts.router == 0
    out = model(tokens(tiny), tokens(tiny))
    assert out.router_stats == [] and out.balance_loss == 0 and out.loss == out.ce_loss


def test_dense_small_matches_small_in_active_parameters_and_flops():
    with torch.device("meta"):
        moe = MoETransformer(load_config("small").model)
        dense = MoETransformer(load_config("dense_small").model)
    router = moe.param_counts().router
    assert dense.param_counts().active == moe.param_counts().active - router
    assert dense.flops_per_token() == moe.flops_per_token() - 2 * router


def test_tied_embeddings_share_one_weight(tiny):
    model = MoETransformer(replace(tiny, tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight
    untied = MoETransformer(tiny)
    assert untied.param_counts().total - model.param_counts().total == tiny.vocab_size * tiny.d_model


def test_param_counts_add_up_to_the_real_parameters(tiny):
    for cfg in (tiny, replace(tiny, moe_every=2, n_kv_heads=2), replace(tiny, tie_embeddings=True)):
        model = MoETransformer(cfg)
        counts = model.param_counts()
        assert counts.total == sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert counts.experts == expert_params
        assert counts.active == counts.total - expert_params * (cfg.n_experts - cfg.top_k) // cfg.n_experts


def test_flops_per_token_follow_the_palm_formula(tiny):
    model = MoETransformer(tiny)
    c, cfg = model.param_counts(), tiny
    L, D, H, Dh, V, T = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size, 32
    attn = L * (D * H * Dh * 2 + 2 * D * cfg.n_kv_heads * Dh)
    experts_active = L * cfg.top_k * 3 * D * cfg.d_ff
    router = L * D * cfg.n_experts
    forward = 2 * (attn + experts_active + router + V * D) + 4 * L * H * Dh * T
    assert model.flops_per_token(T) == forward
    assert model.flops_per_token(T, training=True) == 3 * forward
    assert c.attention == attn and c.router == router


def test_gpt4_preset_matches_the_reference_design_on_meta():
    cfg = load_config("gpt4").model
    with torch.device("meta"):
        model = MoETransformer(cfg)
    assert all(p.is_meta for p in model.parameters())  # never materialised
    counts = model.param_counts()
    assert counts.total == pytest.approx(1.8e12, rel=0.05)
    assert counts.active == pytest.approx(280e9, rel=0.10)
    assert counts.attention == pytest.approx(55e9, rel=0.10)
    per_expert = counts.experts / cfg.n_experts
    assert per_expert == pytest.approx(111e9, rel=0.05)
    # ~560 GFLOP per forward token: 2 x active parameters (the article's "280 B active")
    assert model.flops_per_token(seq_len=1) == pytest.approx(560e9, rel=0.05)
    assert (cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.n_kv_heads) == (120, 16, 2, 1)


@pytest.mark.parametrize("preset, total, active", [("small", 30e6, 7.9e6), ("base", 1.0e9, 0.2e9)])
def test_preset_sizes(preset, total, active):
    cfg = load_config(preset).model
    with torch.device("meta"):
        counts = MoETransformer(cfg).param_counts()
    assert counts.total == pytest.approx(total, rel=0.1)
    assert counts.active == pytest.approx(active, rel=0.1)


def test_tiny_preset_is_well_under_a_million_parameters(tiny):
    assert MoETransformer(tiny).param_counts().total < 600_000


def test_sequence_longer_than_the_context_is_a_clear_error(tiny):
    model = MoETransformer(tiny)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model(tokens(tiny, T=tiny.max_seq_len + 1))


def test_training_step_lowers_the_loss(tiny):
    model = MoETransformer(tiny)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(tiny, B=4, T=32)
    losses = []
    for _ in range(20):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def test_attention_over_a_kv_cache_keeps_cudnn_out_on_cuda(tiny, device, monkeypatch):
    """cuDNN's SDPA plans each new shape, and a cache's span grows every decode step: on CUDA the
    calls over a cache run with cuDNN's backend off. Calls without a cache (training) keep every
    backend, and so does every call on a CPU (which has no cuDNN attention to avoid)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["attn_mask"] is not None, torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model, x = MoETransformer(tiny).to(device).eval(), tokens(tiny).to(device)
    cache = KVCache(tiny, slots=2, device=device)
    with torch.no_grad():
        model(x)
        model(x, cache=cache, decode=True)  # the prefill
        model(x[:, :1], cache=cache, decode=True)  # one decode step
    L = tiny.n_layers
    assert seen == [(False, True)] * L + [(True, device == "cpu")] * 2 * L
    assert torch.backends.cuda.cudnn_sdp_enabled()  # put back after each call


@pytest.mark.cuda
@requires_cuda
def test_cuda_bf16_autocast_forward_backward(tiny):
    model = MoETransformer(tiny).cuda()
    x = tokens(tiny).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, x)
    out.loss.backward()
    assert out.loss.isfinite()
    assert model.blocks[0].ffn.experts.w1.grad.abs().sum() > 0
