"""Tests for sae.py: hand-computed small cases, independent numpy references, invariants, and
feature recovery on synthetic data with known directions. Run: pytest -q tests/test_sae.py"""
import copy
import json
import os
import numpy as np
import pytest
import safetensors.torch
import torch

import sae as sae_lib
from sae import ARCHS, SAE


def set_params(sae, W_enc, W_dec, b_enc, b_dec):
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))


def dense(kept, sae, x):
    """training_loss's kept entries as the dense (B, F) latents f."""
    idx, vals = kept
    return torch.zeros(len(x) * sae.cfg["d_sae"]).index_put_((idx,), vals).view(len(x), -1)


def random_sae(arch, d=8, F=32, k=4, seed=0, threshold=0.05, **meta):
    """An SAE with non-trivial biases (and a set threshold) so invariants are not vacuous."""
    sae = SAE(d, F, arch=arch, k=k, group_fractions=(1/4, 1/4, 1/2), seed=seed, **meta)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
        if arch == "relu":  # give the rows unequal norms, as after ReLU+L1 training
            sae.W_dec.mul_(torch.rand(F, 1, generator=g) + 0.5)
        else:
            sae.threshold.fill_(threshold)
    return sae


# ---------------------------------------------------------------------------------------------
# Construction

def test_group_sizes():
    assert sae_lib.matryoshka_group_sizes(4096, (1/32, 1/16, 1/8, 1/4, 1/2 + 1/32)) == [128, 256, 512, 1024, 2176]
    for F in (1001, 333, 4097):
        sizes = SAE(4, F).cfg["group_sizes"]
        assert sum(sizes) == F and len(sizes) == 5
    assert SAE(4, 333, arch="batchtopk").cfg["group_sizes"] == [333]
    with pytest.raises(ValueError, match="empty group"):
        SAE(4, 16)  # int(16/32) = 0
    with pytest.raises(ValueError, match="unknown SAE arch"):
        SAE(4, 64, arch="jumprelu")


def test_init():
    sae = SAE(16, 64, arch="batchtopk", seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T)  # tied init (§1.4)
    assert not sae.b_enc.any() and not sae.b_dec.any() and sae.threshold.item() == -1
    assert torch.equal(SAE(16, 64, arch="batchtopk", seed=3).W_dec, sae.W_dec)  # seeded
    assert not torch.equal(SAE(16, 64, arch="batchtopk", seed=4).W_dec, sae.W_dec)
    relu = SAE(16, 64, arch="relu", l1_coefficient=0.03)
    assert torch.allclose(relu.W_dec.norm(dim=1), torch.full((64,), 0.1))  # §2
    assert torch.equal(relu.W_enc, relu.W_dec.T)
    assert relu.cfg["l1_coefficient"] == 0.03 and relu.cfg["k"] is None
    json.dumps(SAE(16, 64, model="m", layer=3, mask_prob=0.3).cfg)  # JSON-serialisable


# ---------------------------------------------------------------------------------------------
# Training objective: hand-computed tiny case (d=2, F=4, B=3, k=1)

W_ENC = [[1, 0, -1, 0.5], [0, 1, 0, 0.5]]
W_DEC = [[1, 0], [0, 1], [-0.6, 0.8], [0.6, 0.8]]
B_ENC = [0, 0, 0.2, 0]
B_DEC = [0.5, 0]
X = torch.tensor([[2.5, 0.5], [0.6, 0.2], [-0.5, 3.0]])
# x - b_dec = [2, .5], [.1, .2], [-1, 3], so the post-ReLU pre-activations are
#   token 0: [2,   0.5, 0,   1.25]
#   token 1: [0.1, 0.2, 0.1, 0.15]
#   token 2: [0,   3,   1.2, 1   ]
# BatchTopK keeps the k*B = 3 largest of all twelve: 3, 2 and 1.25 (1.2 is the first one dropped).
EXPECTED_F = torch.tensor([[2, 0, 0, 1.25], [0, 0, 0, 0], [0, 3, 0, 0]])
# x̂ = f W_dec + b_dec = [3.25, 1], [0.5, 0], [0.5, 3]; squared errors .8125, .05, 1.
EXPECTED_MSE = (0.8125 + 0.05 + 1) / 3


def numpy_prefix_losses(x, f, W_dec, b_dec, sizes):
    """Reference: L_i = mean_b Σ_d (x - b_dec - Σ_{j < end_i} f_j W_dec,j)², written with loops."""
    x, f, W_dec, b_dec = (np.asarray(t, dtype=np.float64) for t in (x, f, W_dec, b_dec))
    losses = []
    for end in np.cumsum(sizes):
        per_token = []
        for b in range(len(x)):
            x_hat = b_dec + sum(f[b, j] * W_dec[j] for j in range(end))
            per_token.append(((x[b] - x_hat) ** 2).sum())
        losses.append(np.mean(per_token))
    return np.array(losses)


def tiny_sae(arch, group_fractions=(1/32, 1/16, 1/8, 1/4, 1/2 + 1/32)):
    sae = SAE(2, 4, arch=arch, k=1, group_fractions=group_fractions)
    set_params(sae, W_ENC, W_DEC, B_ENC, B_DEC)
    return sae


def test_batchtopk_hand_case():
    sae = tiny_sae("batchtopk")
    loss, stats, kept = sae.training_loss(X)
    f = dense(kept, sae, X)
    assert torch.equal(f, EXPECTED_F)
    assert (f > 0).sum(-1).tolist() == [2, 0, 1]  # per-token L0 varies, the mean is k = 1
    assert stats["l0"].item() == 1
    assert loss.item() == pytest.approx(EXPECTED_MSE, rel=1e-6)
    assert stats["rec"].item() == pytest.approx(EXPECTED_MSE, rel=1e-6) and stats["aux"].item() == 0


def test_topk_hand_case():
    sae = tiny_sae("topk")
    f = dense(sae.training_loss(X)[2], sae, X)
    # per token: the single largest pre-activation (token 1's is 0.2 at latent 1)
    assert torch.equal(f, torch.tensor([[2, 0, 0, 0], [0, 0.2, 0, 0], [0, 3, 0, 0]]))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_select_ascending_orders_the_kept_entries_row_major(arch):
    """The sparse products walk the kept entries token by token, columns in order."""
    sae = random_sae(arch, d=8, F=32, k=4)
    a = sae.pre_acts(torch.randn(16, 8, generator=torch.Generator().manual_seed(0))).detach()
    idx, vals = sae.select(a, ascending=True)
    assert torch.all(idx[1:] > idx[:-1]) and torch.equal(a.flatten()[idx], vals)
    assert torch.equal(idx, sae.select(a)[0].sort().values)  # the same set as unordered


def test_matryoshka_hand_case():
    sae = tiny_sae("matryoshka_batchtopk", group_fractions=(1/4, 1/4, 1/2))
    assert sae.cfg["group_sizes"] == [1, 1, 2]
    loss, stats, kept = sae.training_loss(X)
    assert torch.equal(dense(kept, sae, X), EXPECTED_F)  # one shared selection for all prefixes (§1.7)
    # By hand: prefix {0}: errors .25, .05, 10; prefix {0,1}: .25, .05, 1; all: as above.
    hand = np.array([10.3 / 3, 1.3 / 3, EXPECTED_MSE])
    reference = numpy_prefix_losses(X, EXPECTED_F, W_DEC, B_DEC, [1, 1, 2])
    np.testing.assert_allclose(reference, hand, rtol=1e-7)  # X is float32
    np.testing.assert_allclose(stats["prefix_losses"].numpy(), reference, rtol=1e-6)
    # L_rec = (1/G) Σ_i (1/G) L_i: dictionary_learning's 1/G² weighting (§1.8)
    assert loss.item() == pytest.approx(reference.sum() / 9, rel=1e-6)
    assert stats["rec"].item() == pytest.approx(EXPECTED_MSE, rel=1e-6)


def test_relu_loss_hand_case():
    sae = tiny_sae("relu")
    sae.cfg["l1_coefficient"] = 0.5
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([[1.0], [2.0], [1.0], [0.5]]))  # row norms 1, 2, 1, 0.5
    loss, stats, kept = sae.training_loss(X, l1_scale=0.1)
    assert kept is None  # no selection: the latents are all of pre_acts(x)
    a = np.maximum(X.numpy() @ np.array(W_ENC) + np.array(B_ENC), 0)  # no pre-encoder bias (§2)
    np.testing.assert_allclose(sae.pre_acts(X).detach().numpy(), a, rtol=1e-6)
    mse = ((X.numpy() - a @ sae.W_dec.detach().numpy() - np.array(B_DEC)) ** 2).sum(1).mean()
    l1 = (a * np.array([1, 2, 1, 0.5])).sum(1).mean()
    assert stats["rec"].item() == pytest.approx(mse, rel=1e-5)
    assert loss.item() == pytest.approx(mse + 0.5 * 0.1 * l1, rel=1e-5)


def test_training_l0_is_exactly_k_and_varies_per_token():
    sae = SAE(16, 256, arch="matryoshka_batchtopk", k=8, group_fractions=(1/4, 3/4))
    x = torch.randn(512, 16)
    _, stats, kept = sae.training_loss(x)
    per_token = (dense(kept, sae, x) > 0).sum(-1)
    assert stats["l0"].item() == 8 and per_token.float().mean().item() == 8
    assert per_token.min() < 8 < per_token.max()


# ---------------------------------------------------------------------------------------------
# Aux-k (§1.10)

def numpy_aux_loss(x, f, a, W_dec, b_dec, dead):
    x, f, a, W_dec, b_dec = (np.asarray(t, dtype=np.float64) for t in (x, f, a, W_dec, b_dec))
    k_aux = min(x.shape[1] // 2, int(dead.sum()))
    e = x - (f @ W_dec + b_dec)
    e_hat = np.zeros_like(e)
    dead_ids = np.flatnonzero(dead)
    for b in range(len(x)):
        top = dead_ids[np.argsort(-a[b, dead_ids], kind="stable")[:k_aux]]
        e_hat[b] = a[b, top] @ W_dec[top]  # no b_dec
    return ((e - e_hat) ** 2).sum(1).mean() / ((e - e.mean(0)) ** 2).sum(1).mean()


@pytest.mark.parametrize("n_dead", [3, 1])  # k_aux = min(d/2 = 2, n_dead) = 2, then 1
def test_aux_loss_matches_numpy(n_dead):
    sae = random_sae("batchtopk", d=4, F=16, k=1)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    unfired = (dense(sae.training_loss(x)[2], sae, x) == 0).all(0).nonzero().squeeze(1)
    dead = torch.zeros(16, dtype=torch.bool).index_fill_(0, unfired[:n_dead], True)  # x fires none
    loss, stats, kept = sae.training_loss(x, dead)
    f = dense(kept, sae, x)
    a = sae.pre_acts(x).detach()
    expected = numpy_aux_loss(x, f, a, sae.W_dec.detach(), sae.b_dec.detach(), dead.numpy())
    assert expected > 0
    assert stats["aux"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(stats["rec"].item() + expected / 32, rel=1e-5)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_aux_loss_leaves_out_dead_latents_that_fire_in_the_batch(sparse):
    """dictionary_learning resets the counters of the latents a batch fires before aux-k reads
    them, so a latent that was dead but fires now gets no aux-k gradient from this batch."""
    sae = random_sae("batchtopk", d=4, F=16, k=1)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    every = torch.ones(16, dtype=torch.bool)  # all dead before this batch
    loss, stats, kept = sae.training_loss(x, every, sparse=sparse)
    f = dense(kept, sae, x)
    fired = (f != 0).any(0)
    assert 0 < fired.sum() < 16
    a, W_dec, b_dec = sae.pre_acts(x).detach(), sae.W_dec.detach(), sae.b_dec.detach()
    expected = numpy_aux_loss(x, f, a, W_dec, b_dec, (~fired).numpy())
    assert stats["aux"].item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(numpy_aux_loss(x, f, a, W_dec, b_dec, every.numpy()), rel=1e-3)
    loss.backward()
    # aux-k is the only gradient a latent that did not fire gets; a fired one gets the usual one
    unfired_grad = sae.W_enc.grad[:, ~fired].abs().sum(0)
    assert (unfired_grad > 0).any()


def test_aux_loss_zero_without_dead_latents():
    sae = random_sae("matryoshka_batchtopk")
    x = torch.randn(16, 8)
    loss_none, stats_none, _ = sae.training_loss(x)
    loss_alive, stats_alive, _ = sae.training_loss(x, torch.zeros(32, dtype=torch.bool))
    assert stats_none["aux"].item() == 0 and stats_alive["aux"].item() == 0
    assert loss_none.item() == loss_alive.item()


# ---------------------------------------------------------------------------------------------
# Decoder constraint (§1.12)

def test_decoder_rows_stay_unit_norm_and_projection_is_orthogonal():
    sae = random_sae("matryoshka_batchtopk", d=16, F=64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        loss, _, _ = sae.training_loss(torch.randn(64, 16))
        optimizer.zero_grad()
        loss.backward()
        parallel_before = (sae.W_dec.grad * sae.W_dec).sum(1).abs().max()
        sae_lib.project_decoder_grad(sae)
        assert parallel_before > 1e-4  # the raw gradient does have a radial part to remove
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
        optimizer.step()
        assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step leaves the sphere ...
        sae_lib.normalize_decoder(sae)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)  # ... and comes back


def test_relu_arch_has_no_decoder_constraint():
    sae = random_sae("relu")
    sae.training_loss(torch.randn(16, 8))[0].backward()
    W, grad = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae_lib.project_decoder_grad(sae)
    sae_lib.normalize_decoder(sae)
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, grad)


# ---------------------------------------------------------------------------------------------
# The sparse training path (sae.py's default on CPU) against the plain dense math

def plain_matryoshka_loss(sae, x):
    """§1.7-1.8 written out with stock autograd: one batch top-k selection, then each prefix's
    reconstruction error, L_rec = (1/G²) Σ_i L_i (no aux-k)."""
    a = sae.pre_acts(x)
    idx, _ = sae.select(a.detach())
    f = torch.zeros_like(a).flatten().scatter(0, idx, a.flatten()[idx]).view_as(a)
    ends = np.cumsum(sae.cfg["group_sizes"])
    losses = [(x - f[:, :end] @ sae.W_dec[:end] - sae.b_dec).pow(2).sum(-1).mean() for end in ends]
    return sum(losses) / len(ends) ** 2


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_training_loss_gradients_match_stock_autograd(sparse):
    """The hand-written backward passes (prefix losses, sparse products) against autograd's own."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for loss_fn in (plain_matryoshka_loss, lambda sae, x: sae.training_loss(x, sparse=sparse)[0]):
        sae = random_sae("matryoshka_batchtopk")
        loss = loss_fn(sae, x)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in sae.parameters()])
    for name, plain, ours in zip(["loss", "W_enc", "W_dec", "b_enc", "b_dec"], *grads):
        assert plain.abs().max() > 0, name
        assert torch.allclose(plain, ours, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk", "batchtopk", "topk", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_training_loss_in_the_dtype_the_sae_is_built_in(arch, dtype):
    """An SAE converted with .to(dtype) trains in that dtype (the sparse path where it exists for
    the dtype: fp64 on a CPU); fp64 gives fp32's loss to fp32's precision."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    dead = torch.arange(32) % 3 == 0
    sae32 = random_sae(arch)
    sae = copy.deepcopy(sae32).to(dtype)
    loss, stats, _ = sae.training_loss(x, dead)
    loss.backward()
    assert loss.dtype == dtype and stats["rec"].dtype == dtype and stats["fired"].any()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in sae.parameters())
    tolerance = 1e-5 if dtype == torch.float64 else 0.05
    assert loss.item() == pytest.approx(sae32.training_loss(x, dead)[0].item(), rel=tolerance)


def test_float64_gradients_match_stock_autograd_to_float64_precision():
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for loss_fn in (plain_matryoshka_loss, lambda sae, x: sae.training_loss(x)[0]):
        sae = random_sae("matryoshka_batchtopk").double()
        loss_fn(sae, x).backward()
        grads.append([p.grad for p in sae.parameters()])
    for plain, ours in zip(*grads):
        assert torch.allclose(plain, ours, rtol=1e-12, atol=1e-14)


def test_prefix_losses_backward_with_unequal_weights():
    """_PrefixLosses' backward for any weighting of the G losses, by finite differences (fp64)."""
    g = torch.Generator().manual_seed(4)
    r0 = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    parts = torch.randn(6, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r0, parts: sae_lib._PrefixLosses.apply(r0, parts)[0] @ weights,
                                    (r0, parts))


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk", "batchtopk", "topk"])
@pytest.mark.parametrize("n_dead", [None, 0, 3, 11])
def test_sparse_path_matches_dense(arch, n_dead):
    """Loss terms, kept latents and every parameter gradient agree. d=8 gives k_aux = 4, so 3 dead
    latents decode all of them and 11 need aux-k's own top-k. The dead mask also holds every
    latent x fires, which aux-k leaves out (a mask of only those: no aux-k)."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    probe = random_sae(arch)
    fired = (dense(probe.training_loss(x)[2], probe, x) != 0).any(0)
    unfired = (~fired).nonzero().squeeze(1)
    assert len(unfired) >= 11
    dead = None if n_dead is None else fired.clone().index_fill_(0, unfired[:n_dead], True)
    results = []
    for sparse in (False, True):
        sae = random_sae(arch)
        loss, stats, kept = sae.training_loss(x, dead, sparse=sparse)
        loss.backward()
        results.append((stats, dense(kept, sae, x), [p.grad for p in sae.parameters()]))
    (dense_stats, dense_f, dense_grads), (sparse_stats, sparse_f, sparse_grads) = results
    assert (dense_stats["aux"] > 0) == bool(n_dead)  # aux-k ran exactly when an unfired latent was dead
    for key in ("loss", "rec", "aux", "prefix_losses", "l0", "min_act"):
        assert torch.allclose(dense_stats[key], sparse_stats[key], rtol=1e-5), key
    assert torch.equal(dense_f != 0, sparse_f != 0) and torch.allclose(dense_f, sparse_f, atol=1e-6)
    for stats, f in ((dense_stats, dense_f), (sparse_stats, sparse_f)):  # the loop's bookkeeping from f
        assert torch.equal(stats["fired"], (f != 0).any(0)) and not stats["fired"].all()
        assert stats["min_act"] == sae_lib.batch_min_positive(f)
    for name, dense_grad, sparse_grad in zip(["W_enc", "W_dec", "b_enc", "b_dec"], dense_grads, sparse_grads):
        assert dense_grad.abs().max() > 0, name
        assert torch.allclose(dense_grad, sparse_grad, rtol=1e-4, atol=1e-6), name


def test_sparse_path_under_gradient_accumulation():
    """Losses built before a single backward, on batches of changing size, give the dense path's
    values and gradients: each loss keeps its own saved tensors for the backward."""
    batches = [torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in (32, 32, 16)]
    results = []
    for sparse in (False, True):
        sae = random_sae("matryoshka_batchtopk")
        losses = [sae.training_loss(x, sparse=sparse)[0] for x in batches]
        sum(losses).backward()
        results.append((torch.stack(losses).detach(), [p.grad for p in sae.parameters()]))
    (dense_losses, dense_grads), (sparse_losses, sparse_grads) = results
    assert torch.allclose(dense_losses, sparse_losses, rtol=1e-5)
    for dense_grad, sparse_grad in zip(dense_grads, sparse_grads):
        assert torch.allclose(dense_grad, sparse_grad, rtol=1e-4, atol=1e-6)


def test_sparse_path_ignores_unkept_zero_activations():
    """Fewer than k*B positive pre-activations: BatchTopK then keeps some zeros, which must get no
    gradient (the ReLU's), exactly as in the dense path."""
    sae = random_sae("batchtopk", k=8)
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # most pre-activations negative
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for sparse in (False, True):
        sae.zero_grad()
        loss, stats, _ = sae.training_loss(x, sparse=sparse)
        loss.backward()
        assert stats["l0"].item() < 8  # the kept set did include zeros
        grads.append([p.grad.clone() for p in sae.parameters()])
    for dense_grad, sparse_grad in zip(*grads):
        assert torch.allclose(dense_grad, sparse_grad, rtol=1e-4, atol=1e-6)


def check_batch_topk(a, n_keep, select=sae_lib.batch_topk):
    idx, vals = select(a, n_keep, ascending=True)
    assert len(idx) == n_keep and torch.all(idx[1:] > idx[:-1])  # distinct, ascending
    assert torch.equal(a.flatten()[idx], vals)
    assert torch.equal(vals.sort().values, a.flatten().topk(n_keep).values.sort().values)


@pytest.mark.parametrize("shape, k", [((64, 256), 4), ((7, 256), 4), ((64, 256), 40), ((2, 3), 3)])
def test_batch_topk_equals_one_topk(shape, k):
    """The CPU path cuts at a threshold estimated from a sample. Integer values make ties at the
    cut (any tied choice is a valid top); the first rows hold all the largest values."""
    a = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0)).float()
    a[:2] += 1000
    check_batch_topk(a, k * shape[0])


def test_batch_topk_when_the_sample_misjudges_the_cut():
    """Every 61st entry (the sample) is large, all others small: the sample's cut lets too few
    entries through, and batch_topk must fall back to considering all of them."""
    a = torch.rand(64, 256, generator=torch.Generator().manual_seed(0))
    a.view(-1)[::61] += 10
    check_batch_topk(a, 8 * 64)  # more than the 269 sampled entries


def test_batch_topk_post_relu_zeros():
    """Fewer positive entries than n_keep: the rest of the kept set are zeros, as with topk."""
    a = torch.zeros(32, 64)
    a[3, 5], a[10, 60] = 2.0, 1.0
    check_batch_topk(a, 32)


def test_batch_topk_compiled_is_one_topk():
    """Under torch.compile (and on a GPU) batch_topk is one torch.topk; it keeps the same contract."""
    a = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    check_batch_topk(a, 4 * 64, torch.compile(sae_lib.batch_topk, fullgraph=True, backend="aot_eager"))


# ---------------------------------------------------------------------------------------------
# Training on synthetic data with known features

def synthetic_batch(n, directions, generator, active_per_sample=3, noise=0.01):
    """Sparse nonnegative combinations of known unit directions plus small Gaussian noise."""
    num_features, d = directions.shape
    active = torch.rand(n, num_features, generator=generator) < active_per_sample / num_features
    magnitudes = torch.rand(n, num_features, generator=generator) + 0.5
    return (active * magnitudes) @ directions + noise * torch.randn(n, d, generator=generator)


def train_on_synthetic(arch, steps=1000, d=64, num_features=64, F=128, k=3, batch=256):
    """§1 loop in miniature: geometric-median b_dec, Adam, projection, renormalisation, threshold
    EMA from half-way (the real loop starts it at step 1000)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    directions = torch.randn(num_features, d, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    sae = SAE(d, F, arch=arch, k=k, group_fractions=(1/8, 1/4, 5/8), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(sae_lib.geometric_median(synthetic_batch(2048, directions, generator)))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(steps):
        loss, stats, _ = sae.training_loss(synthetic_batch(batch, directions, generator))
        optimizer.zero_grad()
        loss.backward()
        sae_lib.project_decoder_grad(sae)
        optimizer.step()
        sae_lib.normalize_decoder(sae)
        if step >= steps // 2:
            sae_lib.update_threshold(sae, stats["min_act"])
    return sae, directions, synthetic_batch(4096, directions, generator)


@pytest.fixture(scope="module")
def trained():
    return {arch: train_on_synthetic(arch) for arch in ("batchtopk", "matryoshka_batchtopk")}


def fraction_recovered(sae, directions, min_cosine=0.9):
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best_cosine = (directions @ rows.T).max(dim=1).values
    return (best_cosine > min_cosine).float().mean().item()


def test_recovers_true_features(trained):
    # Checked by temporarily breaking sae.py: keeping k*B random entries, or the k*B smallest, instead
    # of the largest recovers 0% for both archs (and fails the prefix and threshold-L0 tests below).
    # Recovery does NOT notice a missing b_dec subtraction (b_dec ≈ 0 on this data), a missing
    # decoder constraint (Adam copes) or a matryoshka trained on the full-width loss only; the hand
    # cases and the constraint test above catch those.
    sae, directions, _ = trained["batchtopk"]
    assert fraction_recovered(sae, directions) >= 0.9
    sae, directions, _ = trained["matryoshka_batchtopk"]
    assert fraction_recovered(sae, directions) >= 0.8  # inner groups absorb features on this flat toy
    assert fraction_recovered(SAE(64, 128, arch="batchtopk", k=3), directions) < 0.1  # untrained


def test_matryoshka_prefix_losses_decrease_outward(trained):
    sae, _, x = trained["matryoshka_batchtopk"]
    with torch.no_grad():
        _, stats, _ = sae.training_loss(x)
    losses = stats["prefix_losses"]
    assert (losses[1:] <= losses[:-1]).all(), losses


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_inference_threshold_gives_l0_close_to_k(trained, arch):
    sae, _, x = trained[arch]
    assert sae.threshold.item() > 0
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    assert abs(l0 - 3) < 0.5, l0


# ---------------------------------------------------------------------------------------------
# Threshold (§1.11), encode shapes

def test_batch_min_positive_and_threshold_ema():
    assert sae_lib.batch_min_positive(torch.tensor([[0, 0.3], [0.2, 0]])).item() == pytest.approx(0.2)
    assert sae_lib.batch_min_positive(torch.zeros(3, 4)).item() == 0
    sae = SAE(4, 64, arch="batchtopk")
    sae_lib.update_threshold(sae, torch.tensor(2.0, dtype=torch.bfloat16))  # unset: θ ← m
    assert sae.threshold.item() == 2.0 and sae.threshold.dtype == torch.float32
    sae_lib.update_threshold(sae, torch.tensor(4.0))  # θ ← 0.999 θ + 0.001 m
    assert sae.threshold.item() == pytest.approx(0.999 * 2 + 0.001 * 4, rel=1e-7)
    sae_lib.update_threshold(sae, torch.tensor(0.0))
    assert sae.threshold.item() == pytest.approx(0.999 * 2.002, rel=1e-7)


def test_encode_threshold_and_shapes():
    sae = random_sae("batchtopk", threshold=0.2)
    x = torch.randn(2, 5, 8)
    a = sae.pre_acts(x)
    f = sae.encode(x)
    assert f.shape == (2, 5, 32)
    assert torch.equal(f, torch.where(a > 0.2, a, 0.0))
    assert torch.equal(sae.encode(x.reshape(10, 8)), f.reshape(10, 32))  # 3-D input = flattened
    sae.threshold.fill_(-1)  # unset: batch top-k over all 10 tokens of the 3-D input
    assert (sae.encode(x) > 0).sum().item() == 4 * 10
    topk = random_sae("topk")
    assert ((topk.encode(x) > 0).sum(-1) == 4).all()  # per token, never thresholded


# ---------------------------------------------------------------------------------------------
# Geometric median (§1.4)

def test_geometric_median():
    generator = torch.Generator().manual_seed(0)
    center = torch.tensor([1.0, -2.0, 3.0])
    offsets = torch.randn(50, 3, generator=generator)
    symmetric = torch.cat([center + offsets, center - offsets])  # median = center by symmetry
    median = sae_lib.geometric_median(symmetric)
    assert torch.allclose(median, center, atol=1e-4)
    # first-order optimality on an asymmetric cloud: the unit vectors to the points sum to ~0
    cloud = torch.randn(200, 3, generator=generator).double() ** 3
    median = sae_lib.geometric_median(cloud).double()
    units = (cloud - median) / (cloud - median).norm(dim=1, keepdim=True)
    assert units.sum(0).norm() < 1e-2 * len(cloud)
    # robust: one huge outlier moves the mean by ~10 but the median barely
    with_outlier = torch.cat([symmetric, torch.tensor([[1000.0, 0, 0]])])
    assert (with_outlier.mean(0) - center).norm() > 5
    assert (sae_lib.geometric_median(with_outlier) - center).norm() < 0.1


# ---------------------------------------------------------------------------------------------
# Folding the scale (§1.15)

@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scale(arch):
    s = 2.5
    sae = random_sae(arch)
    before = copy.deepcopy(sae)
    sae_lib.fold_scale(sae, s)
    x = 3 * torch.randn(20, 8)
    f = before.encode(x / s)
    assert f.count_nonzero() > 0
    with torch.no_grad():
        if arch == "relu":  # the decoder row norms moved into the latents, rows are unit norm (§2)
            norms = before.W_dec.norm(dim=1)
            assert torch.allclose(sae.encode(x), s * norms * f, rtol=1e-5, atol=1e-6)
            assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
        else:
            assert torch.allclose(sae.encode(x), s * f, rtol=1e-5, atol=1e-6)
            assert torch.allclose(sae.decode(s * f), s * before.decode(f), rtol=1e-5, atol=1e-6)
        assert torch.allclose(sae(x), s * before(x / s), rtol=1e-5, atol=1e-5)
    assert sae.cfg["scale"] == s
    with pytest.raises(ValueError, match="already folded"):
        sae_lib.fold_scale(sae, s)


# ---------------------------------------------------------------------------------------------
# Save / load

def test_save_load_round_trip(tmp_path):
    sae = random_sae("matryoshka_batchtopk", model="pythia-160m-deduped", layer=3, hook="resid_post",
                     mask_prob=0.3, mask_token="<|padding|>", train_on_masked=True, tokens=1000)
    sae_lib.fold_scale(sae, 1.7)
    sae_lib.save(sae, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae.safetensors"]  # no .tmp left
    for path in (str(tmp_path), str(tmp_path / "sae.safetensors")):
        loaded = sae_lib.load(path)
        assert loaded.cfg == sae.cfg
        for name, tensor in sae.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        x = torch.randn(7, 8)
        assert torch.equal(loaded.encode(x), sae.encode(x))


def test_an_export_from_before_calibration_loads_with_its_ema_threshold_and_a_note(tmp_path, capsys):
    """cfg.json written before train.py calibrated thresholds has no threshold_* keys: the stored
    θ (the EMA) is used, and one line says so; a calibrated export loads silently."""
    old = random_sae("matryoshka_batchtopk")
    old.threshold.fill_(0.25)
    sae_lib.save(old, str(tmp_path / "old"))
    loaded = sae_lib.load(str(tmp_path / "old"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "records no calibrated threshold" in out and "EMA θ = 0.25" in out
    assert float(loaded.threshold) == 0.25 and "threshold_used" not in loaded.cfg
    new = random_sae("matryoshka_batchtopk")
    new.threshold.fill_(0.5)
    new.cfg.update(threshold_used="calibrated", threshold_ema=0.25, threshold_calibrated=0.5)
    sae_lib.save(new, str(tmp_path / "new"))
    assert float(sae_lib.load(str(tmp_path / "new")).threshold) == 0.5
    assert capsys.readouterr().out == ""


def test_topk_loads_as_topk(tmp_path):
    """SAELens#308: a TopK SAE loaded as ReLU has L0 of hundreds instead of k."""
    sae_lib.save(random_sae("topk"), str(tmp_path))
    loaded = sae_lib.load(str(tmp_path))
    assert loaded.cfg["arch"] == "topk"
    assert ((loaded.encode(torch.randn(10, 8)) > 0).sum(-1) == 4).all()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        sae_lib.load(str(tmp_path / "nowhere"))
    folder = str(tmp_path)
    cfg_path, weights_path = tmp_path / "cfg.json", tmp_path / "sae.safetensors"

    def saved_with(edit_cfg=None, edit_tensors=None):
        sae = random_sae("batchtopk")
        sae_lib.save(sae, folder)
        if edit_cfg:
            cfg = json.loads(cfg_path.read_text())
            edit_cfg(cfg)
            cfg_path.write_text(json.dumps(cfg))
        if edit_tensors:
            tensors = safetensors.torch.load_file(str(weights_path))
            edit_tensors(tensors)
            safetensors.torch.save_file(tensors, str(weights_path))

    saved_with()
    weights_path.write_bytes(weights_path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sae_lib.load(folder)
    saved_with()
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sae_lib.load(folder)
    saved_with(edit_cfg=lambda cfg: cfg.update(d_sae=64, group_sizes=[64]))
    with pytest.raises(ValueError, match="'W_enc' has shape"):
        sae_lib.load(folder)
    saved_with(edit_cfg=lambda cfg: cfg.update(arch="jumprelu"))
    with pytest.raises(ValueError, match="unknown arch 'jumprelu'"):
        sae_lib.load(folder)
    saved_with(edit_cfg=lambda cfg: cfg.pop("arch"))  # never defaulted to anything
    with pytest.raises(ValueError, match="missing key 'arch'"):
        sae_lib.load(folder)
    saved_with(edit_cfg=lambda cfg: cfg.update(group_sizes=[16, 8]))
    with pytest.raises(ValueError, match="group_sizes"):
        sae_lib.load(folder)
    saved_with(edit_tensors=lambda tensors: tensors.pop("threshold"))
    with pytest.raises(ValueError, match="missing tensor 'threshold'"):
        sae_lib.load(folder)
    saved_with(edit_tensors=lambda tensors: tensors.update(threshold=torch.zeros(32)))  # a JumpReLU file
    with pytest.raises(ValueError, match="'threshold' has shape"):
        sae_lib.load(folder)


def test_load_converts_other_float_dtypes_with_a_note(tmp_path, capsys):
    sae = random_sae("batchtopk")
    sae_lib.save(sae, str(tmp_path))
    tensors = safetensors.torch.load_file(str(tmp_path / "sae.safetensors"))
    safetensors.torch.save_file({n: t.half() for n, t in tensors.items()}, str(tmp_path / "sae.safetensors"))
    loaded = sae_lib.load(str(tmp_path))
    assert "stores float16 weights; converted to float32" in capsys.readouterr().out
    assert loaded.W_enc.dtype == torch.float32 and torch.equal(loaded.W_enc, sae.W_enc.half().float())


def test_load_refuses_integer_or_non_finite_weights_and_k_above_d_sae(tmp_path):
    def saved(edit_cfg=None, **replace):
        sae = random_sae("batchtopk")
        sae_lib.save(sae, str(tmp_path))
        tensors = safetensors.torch.load_file(str(tmp_path / "sae.safetensors"))
        safetensors.torch.save_file({**tensors, **replace}, str(tmp_path / "sae.safetensors"))
        if edit_cfg:
            cfg = json.loads((tmp_path / "cfg.json").read_text())
            cfg.update(edit_cfg)
            (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        return tensors

    tensors = saved()
    saved(W_enc=tensors["W_enc"].long())
    with pytest.raises(ValueError, match="tensor 'W_enc' is torch.int64; SAE weights must be floating point"):
        sae_lib.load(str(tmp_path))
    b_dec = tensors["b_dec"].clone()
    b_dec[3] = float("nan")
    saved(b_dec=b_dec)
    with pytest.raises(ValueError, match="tensor 'b_dec' holds 1 NaN/inf values"):
        sae_lib.load(str(tmp_path))
    saved(edit_cfg=dict(k=33))  # d_sae = 32
    with pytest.raises(ValueError, match=r"needs an integer k in \[1, d_sae=32\], got 33"):
        sae_lib.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# SAELens export

def saelens_jumprelu_encode(folder, x):
    """SAELens's JumpReLUSAE.encode, written out from its source (sae_lens/saes/jumprelu_sae.py,
    process_sae_in in sae_lens/saes/sae.py), applied to the exported files."""
    cfg = json.loads(open(os.path.join(folder, "cfg.json")).read())
    w = safetensors.torch.load_file(os.path.join(folder, "sae_weights.safetensors"))
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    return torch.relu(hidden_pre) * (hidden_pre > w["threshold"].relu())


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk", "batchtopk", "relu"])
def test_export_saelens(tmp_path, arch):
    sae = random_sae(arch, threshold=0.1, model="pythia-160m-deduped", layer=3)
    sae_lib.fold_scale(sae, 2.0)
    sae_lib.export_saelens(sae, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (8, 32)
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] == (arch != "relu")
    x = 2 * torch.randn(50, 8)
    expected = sae.encode(x).detach()
    assert expected.count_nonzero() > 0 and (arch == "relu" or (expected == 0).any())
    assert torch.equal(saelens_jumprelu_encode(str(tmp_path), x), expected)


def test_export_saelens_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="TopK"):
        sae_lib.export_saelens(random_sae("topk", layer=3), str(tmp_path))
    with pytest.raises(ValueError, match="threshold is unset"):
        sae_lib.export_saelens(random_sae("batchtopk", threshold=-1, layer=3), str(tmp_path))


# ---------------------------------------------------------------------------------------------
# torch.compile. The inductor test takes ~35 s on a cold cache here (~3 s warm, the kernels are
# cached on disk); fullgraph=True makes a graph break an error.

@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_compiled_training_loss_matches_eager(sparse):
    """The dense path (CUDA's) compiles whole with inductor. train.py's compile=on wraps the sparse
    path too, which then has graph breaks (the host-side dead count, the sparse products); both
    must give the eager values and gradients."""
    sae = random_sae("matryoshka_batchtopk", d=16, F=64)
    x = torch.randn(32, 16)
    dead = torch.arange(64) % 3 == 0
    eager = lambda x, dead: sae.training_loss(x, dead, sparse=sparse)[0]  # noqa: E731
    compiled = torch.compile(eager, backend="aot_eager") if sparse else torch.compile(eager, fullgraph=True)
    results = []
    for loss_fn in (compiled, eager):
        sae.zero_grad()
        loss = loss_fn(x, dead)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in sae.parameters()]))
    (compiled_loss, compiled_grads), (eager_loss, eager_grads) = results
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        assert torch.allclose(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_other_paths_compile_without_graph_breaks(arch):
    sae = random_sae(arch)
    x = torch.randn(16, 8)
    compiled = torch.compile(lambda x: sae.training_loss(x, l1_scale=0.5, sparse=False)[0],
                             backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), sae.training_loss(x, l1_scale=0.5, sparse=False)[0])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_training_loss_under_bf16_autocast(sparse):
    """train.py runs the step under bf16 autocast on CUDA; CPU autocast takes the same code path.
    The loss and the gradients of the fp32 parameters stay fp32, finite, and close to fp32's."""
    sae = SAE(64, 256, arch="matryoshka_batchtopk", k=8, group_fractions=(1/8, 1/4, 5/8), seed=0)
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    dead = torch.rand(256, generator=torch.Generator().manual_seed(1)) < 0.1
    losses = []
    for autocast in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, stats, _ = sae.training_loss(x, dead, sparse=sparse)
        loss.backward()
        assert loss.dtype == torch.float32 and stats["fired"].any() and stats["min_act"] > 0
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in sae.parameters())
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
