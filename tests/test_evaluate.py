"""Tests for evaluate.py: every metric on constructed cases whose answer is known by construction
or computed independently here (hand formulas, brute force, per-token loops), plus one end-to-end
run of main() on the tiny random model (configs/tiny.py).

    pytest -q tests/test_evaluate.py
"""
import importlib.util
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import compare
import configurator
import evaluate as ev
import model as model_lib
import sae as sae_lib
from conftest import TINY_CONFIG


def relu_sae(W_enc, W_dec, b_enc=None, b_dec=None):
    """A real sae.SAE (ReLU arch: f = ReLU(x W_enc + b_enc), x̂ = f W_dec + b_dec) with given weights."""
    d, F = W_enc.shape
    s = sae_lib.SAE(d, F, arch="relu")
    with torch.no_grad():
        s.W_enc.copy_(W_enc)
        s.W_dec.copy_(W_dec)
        s.b_enc.copy_(torch.zeros(F) if b_enc is None else b_enc)
        s.b_dec.copy_(torch.zeros(d) if b_dec is None else b_dec)
    return s


def identity_sae(d):
    """x̂ = ReLU(x) − ReLU(−x) = x exactly, with unit decoder rows [I; −I]."""
    eye = torch.eye(d)
    return relu_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


def zero_sae(d, F=8):
    """encode gives 0 everywhere (the threshold is never reached), decode(0) = b_dec = 0."""
    s = sae_lib.SAE(d, F, arch="batchtopk", k=2)
    with torch.no_grad():
        s.threshold.fill_(1e9)
    return s


# ----------------------------------------------------------------------------- §1 core

def test_l0_counts_nonzero_latents_on_2d_and_3d_input():
    f2 = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, -1.0]])
    assert ev.l0(f2) == pytest.approx((2 + 0 + 2) / 3)
    f3 = torch.stack([f2, torch.ones(3, 3)])  # (B=2, T=3, F=3): 6 tokens
    assert ev.l0(f3) == pytest.approx((2 + 0 + 2 + 3 + 3 + 3) / 6)


def test_explained_variance_three_forms_match_hand_formulas():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 3)) + [2.0, -1.0, 0.5], rng.normal(size=(7, 3)) * 2]
    x_hats = [x * 0.8 + 0.1 for x in batches]
    sums = ev.new_core_sums(3, 4)
    for x, x_hat in zip(batches, x_hats):
        f = torch.tensor(np.abs(x[:, :1]) * np.array([1, 0, 0, 1]))  # 2 non-zero latents per token
        ev.add_core_batch(sums, torch.tensor(x), f, torch.tensor(x_hat))
    r = ev.finish_core(sums)
    X, XH = np.concatenate(batches), np.concatenate(x_hats)
    n, d = X.shape
    sse = ((X - XH) ** 2).sum()
    # global: 1 − SSE / Σ_d Var_d·N (population variance about the global mean)
    assert r["explained_variance"] == pytest.approx(1 - sse / (X.var(axis=0).sum() * n))
    # legacy: per token, centred on its own batch's mean
    legacy = [1 - ((x - xh) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1) for x, xh in zip(batches, x_hats)]
    assert r["explained_variance_legacy"] == pytest.approx(np.concatenate(legacy).mean())
    # SAEBench's current field: mean_b SSE_b/N_b over mean_b(Σ‖x‖²/N_b) − q², q = mean_b,d E_b[x_d²]
    num = np.mean([((x - xh) ** 2).sum() / len(x) for x, xh in zip(batches, x_hats)])
    mean_sq = np.mean([(x ** 2).sum() / len(x) for x in batches])
    q = np.mean([(x ** 2).mean(0) for x in batches])
    assert r["explained_variance_saebench_current"] == pytest.approx(1 - num / (mean_sq - q ** 2))
    assert r["mse"] == pytest.approx(sse / (n * d))
    per_token = [((x - xh) ** 2).sum(1) / len(x) for x, xh in zip(batches, x_hats)]  # SAEBench's mse
    assert r["mse_saebench"] == pytest.approx(np.concatenate(per_token).mean())
    assert r["l0"] == pytest.approx(2.0)
    cos = (X * XH).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(XH, axis=1)
    assert r["cossim"] == pytest.approx(cos.mean())
    assert r["frac_alive"] == pytest.approx(0.5)  # latents 0 and 3 fire, 1 and 2 never


def test_perfect_reconstruction_has_ev_one():
    x = torch.randn(20, 4, dtype=torch.float64)
    sums = ev.new_core_sums(4, 2)
    ev.add_core_batch(sums, x, torch.ones(20, 2), x)
    r = ev.finish_core(sums)
    assert r["explained_variance"] == pytest.approx(1.0)
    assert r["explained_variance_legacy"] == pytest.approx(1.0)
    assert r["l2_ratio"] == pytest.approx(1.0) and r["relative_reconstruction_bias"] == pytest.approx(1.0)


@pytest.fixture
def tiny_model(make_hf_model):
    return model_lib.load(str(make_hf_model("gpt_neox")))  # vocab 96, d 32, 3 layers, special id 0


def test_ce_loss_recovered_identity_sae_is_one_and_matches_the_plain_forward(tiny_model):
    m = tiny_model
    torch.manual_seed(0)
    rows = torch.randint(1, 96, (6, 12))
    rows[:, 0] = 0  # BOS: a special position, kept as is
    r = ev.core_metrics(m, 1, [identity_sae(32)], rows.numpy(), batch_rows=4)[0]
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    # CE without the SAE, independently: the model's own logits, loss at every position but BOS
    logits = m(rows).float()
    ce = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, 96), rows[:, 2:].reshape(-1))
    assert r["ce_loss_without_sae"] == pytest.approx(ce.item(), rel=1e-5)
    assert r["ce_tokens"] == 6 * 10


def greedy_rows(m, n, length, seed):
    """Rows the model itself continues greedily: its clean loss is low, so zero-ablating a layer
    raises it and "recovered" is defined (a random model on random tokens can be better ablated)."""
    torch.manual_seed(seed)
    rows = torch.randint(1, 96, (n, 1))
    while rows.shape[1] < length:
        logits = m(rows)[:, -1]
        logits[:, 0] = float("-inf")  # no special token: the SAE replaces every position
        rows = torch.cat([rows, logits.argmax(-1, keepdim=True)], 1)
    return rows


def test_ce_loss_recovered_zero_output_sae_is_zero(tiny_model):
    rows = greedy_rows(tiny_model, 4, 10, seed=1)
    r = ev.core_metrics(tiny_model, 1, [zero_sae(32)], rows.numpy(), batch_rows=4)[0]
    assert r["ce_loss_with_ablation"] > r["ce_loss_without_sae"]
    assert r["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert r["l0"] == 0 and r["frac_alive"] == 0


def test_ce_loss_recovered_is_left_out_when_ablation_does_not_raise_the_loss(tiny_model):
    """Zero-ablating the last layer gives uniform logits (ln_f of 0 with no bias is 0), loss ln 96;
    a sharpened random head makes the clean loss far worse, so "recovered" would be meaningless."""
    m = tiny_model
    with torch.no_grad():
        m.ln_f.bias.zero_()
        m.head.weight.mul_(30)
    torch.manual_seed(2)
    rows = torch.randint(1, 96, (4, 10))
    r = ev.core_metrics(m, 2, [identity_sae(32)], rows.numpy(), batch_rows=4)[0]
    assert r["ce_loss_with_ablation"] == pytest.approx(math.log(96), rel=1e-5)
    assert r["ce_loss_with_ablation"] < r["ce_loss_without_sae"]
    assert math.isnan(r["ce_loss_score"]) and "does not raise" in r["null_reasons"]["ce_loss_score"]
    assert r["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)  # the other core numbers stay
    assert ev.json_ready(r)[0]["ce_loss_score"] is None


def test_kl_counts_every_valid_position_while_the_ce_drops_the_last(tiny_model):
    """SAEBench's core eval shortens only the CE mask (no next token at the last position); the KL
    compares two distributions and is averaged over every valid position, the last included."""
    m = tiny_model
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(1, 96, (4, 9), generator=gen)
    rows[:, 0] = 0  # BOS
    W_dec = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=1)
    lossy = relu_sae(0.5 * torch.randn(32, 16, generator=gen), W_dec)
    r = ev.core_metrics(m, 1, [lossy], rows.numpy(), batch_rows=4)[0]
    with torch.no_grad():
        resid, valid = m.resid_post(rows, 1), m.valid_mask(rows)
        spliced = resid.clone()
        spliced[valid] = lossy.decode(lossy.encode(resid[valid]))
        clean = torch.log_softmax(m.forward_from(resid, 1), -1)
        with_sae = torch.log_softmax(m.forward_from(spliced, 1), -1)
        kl = (clean.exp() * (clean - with_sae)).sum(-1)
    assert r["kl_tokens"] == 4 * 8 and r["ce_tokens"] == 4 * 7
    assert r["kl_div_with_sae"] == pytest.approx(kl[valid].mean().item(), rel=1e-5)
    assert r["kl_div_with_sae"] != pytest.approx(kl[:, :-1][valid[:, :-1]].mean().item(), rel=1e-3)


def test_core_reports_both_thresholds_and_the_l0_of_each(tiny_model):
    """A calibrated export's cfg.json names the threshold it uses and the EMA one: core gives both,
    its L0 at the used θ ("l0") and at the EMA θ, each as counted by hand on the same tokens."""
    m = tiny_model
    rows = greedy_rows(m, 4, 12, seed=1)
    s = sae_lib.SAE(32, 64, arch="batchtopk", k=8, seed=3)
    x = m.resid_post(torch.as_tensor(rows), 1)[m.valid_mask(torch.as_tensor(rows))]
    a = s.pre_acts(x)
    ema, used = a.quantile(0.9).item(), a.quantile(0.8).item()  # two thresholds, L0 ≈ 6.4 and 12.8
    s.threshold.fill_(used)
    s.cfg.update(threshold_used="calibrated", threshold_ema=ema, threshold_calibrated=used)
    r = ev.core_metrics(m, 1, [s, identity_sae(32)], rows, batch_rows=3)
    assert r[0]["threshold_used"] == "calibrated" and r[0]["threshold_calibrated"] == used
    assert r[0]["l0"] == pytest.approx((a > used).sum(-1).double().mean().item())
    assert r[0]["l0_threshold_ema"] == pytest.approx((a > ema).sum(-1).double().mean().item())
    assert r[0]["l0_threshold_ema"] < r[0]["l0"]
    assert "threshold_ema" not in r[1] and "l0_threshold_ema" not in r[1]  # nothing to report: no EMA


def test_residuals_drop_special_and_padding_positions(tiny_model):
    rows = [[0, 5, 6, 7], [0, 8], [0, 9, 0, 10]]  # BOS, padding, and an EOS mid-row
    acts, counts = ev.residuals(tiny_model, rows, 1, batch_rows=2)
    assert counts.tolist() == [3, 1, 2]
    alone = tiny_model.resid_post(torch.tensor([[0, 8]]), 1)[0, 1]
    assert torch.allclose(acts[3], alone, atol=1e-5)  # right padding does not change a row
    last = ev.residuals(tiny_model, rows, 1, batch_rows=3, positions=[len(r) - 1 for r in rows])
    assert torch.allclose(last[1], alone, atol=1e-5)
    one_by_one = ev.residuals(tiny_model, rows, 1, batch_rows=1)  # batched by length, returned in row order
    assert torch.equal(one_by_one[1], counts) and torch.allclose(one_by_one[0], acts, atol=1e-5)


# ----------------------------------------------------------------------------- §0 probes

def test_two_processes_writing_one_cache_entry_both_succeed(tmp_path, monkeypatch):
    """evaluate.py runs share cache_dir and may compute the same entry at once: here a second
    writer (another pid) runs between the first one's write and its rename; both must land."""
    path, real_fsync, pids = str(tmp_path / "acts.safetensors"), os.fsync, iter(range(100, 200))
    monkeypatch.setattr(ev.os, "getpid", lambda: next(pids))

    def fsync_while_another_process_writes(fd):
        monkeypatch.setattr(ev.os, "fsync", real_fsync)
        ev._write_atomic(path, b"second")
        real_fsync(fd)

    monkeypatch.setattr(ev.os, "fsync", fsync_while_another_process_writes)
    ev._write_atomic(path, b"first")
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path) == ["acts.safetensors"]


def test_l2_logistic_regression_matches_the_symmetric_1d_solution():
    # x = ±1, y = [x > 0]: by symmetry b = 0 and the stationarity condition is w = C·n·(1 − σ(w))
    n, C = 40, 0.3
    x = torch.tensor([[1.0]] * (n // 2) + [[-1.0]] * (n // 2))
    y = (x[:, 0] > 0).double()
    w, b = ev.logistic_regression(x, y, C=C)
    lo, hi = 0.0, 100.0
    for _ in range(200):  # bisection on g(w) = w − C n (1 − σ(w)), increasing in w
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - C * n * (1 - 1 / (1 + math.exp(-mid))) < 0 else (lo, mid)
    assert w.item() == pytest.approx(lo, abs=1e-6)
    assert b.item() == pytest.approx(0.0, abs=1e-6)


def test_l2_logistic_regression_gradient_vanishes_with_balanced_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = (x @ [1.0, -2.0, 0.5, 0.0] + rng.normal(size=300) > 1.2).astype(float)  # imbalanced
    C = 0.7
    w, b = (t.numpy() for t in ev.logistic_regression(x, y, C=C, balanced=True))
    s = np.where(y > 0, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    residual = s * (1 / (1 + np.exp(-(x @ w + b))) - y)
    assert np.abs(w + C * x.T @ residual).max() < 1e-6       # ∂/∂w of 0.5‖w‖² + C Σ s·logloss
    assert abs(C * residual.sum()) < 1e-6                    # ∂/∂b: the intercept is unpenalised


def test_l1_logistic_regression_satisfies_the_kkt_conditions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6))
    y = (x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=200) > 0).astype(float)
    C = 0.05
    w, b = (t.numpy() for t in ev.logistic_regression(x, y, C=C, penalty="l1", tol=1e-12))
    grad = C * x.T @ (1 / (1 + np.exp(-(x @ w + b))) - y)   # of C·Σ logloss
    active = w != 0
    assert active.sum() >= 2 and not active.all()           # sparse, but keeps the two real features
    assert np.allclose(grad[active], -np.sign(w[active]), atol=1e-5)
    assert np.all(np.abs(grad[~active]) <= 1 + 1e-5)
    assert abs(C * (1 / (1 + np.exp(-(x @ w + b))) - y).sum()) < 1e-5     # free intercept


def test_l1_fits_over_a_grid_of_c_equal_the_fits_one_c_at_a_time():
    """find_best_reg fits the whole grid side by side; each column must be the fit at its C alone,
    the ones that converge early and the near-separable ones that run to max_iter alike."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(150, 8))
    y = (x[:, 0] + 0.3 * rng.normal(size=150) > 0).astype(float)
    grid = list(np.logspace(3, -3, 5))
    w, b = (t.numpy() for t in ev.logistic_regression(x, y, C=grid, penalty="l1", max_iter=400))
    assert w.shape == (8, 5) and b.shape == (5,)
    for j, C in enumerate(grid):
        w1, b1 = (t.numpy() for t in ev.logistic_regression(x, y, C=C, penalty="l1", max_iter=400))
        assert np.allclose(w[:, j], w1, rtol=1e-9, atol=1e-12) and b[j] == pytest.approx(b1, rel=1e-9, abs=1e-12)
    assert (w[:, -1] == 0).sum() > (w[:, 0] == 0).sum()  # small C: sparser


def test_l2_fits_over_a_grid_of_c_warm_started_equal_the_fits_from_zeros():
    """The L2 grid is fitted from the smallest C up, each fit starting at the last one's optimum:
    the optimum a fit from zeros reaches, to the stopping tolerance (near-separable data at C 1e5
    included), returned in the grid's own order, each column stationary."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200, 12))
    y = (x[:, 0] - x[:, 3] + 0.2 * rng.normal(size=200) > 0).astype(float)
    grid = list(np.logspace(5, -5, 10))
    w, b = (t.numpy() for t in ev.logistic_regression(x, y, C=grid))
    for j, C in enumerate(grid):
        w1, b1 = (t.numpy() for t in ev.logistic_regression(x, y, C=C))
        scale = max(np.abs(w1).max(), abs(b1))
        assert np.abs(w[:, j] - w1).max() <= 1e-5 * scale and abs(b[j] - b1) <= 1e-5 * scale
        p = 1 / (1 + np.exp(-(x @ w[:, j] + b[j])))
        assert np.abs(w[:, j] + C * x.T @ (p - y)).max() <= 1e-9 * max(1.0, C * len(y)) * 10  # stationary
    assert np.abs(w[:, 0]).sum() > 10 * np.abs(w[:, -1]).sum()  # large C: large weights


def test_auc_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = scores[y], scores[~y]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert ev.roc_auc(scores, y) == pytest.approx(brute)
    assert ev.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and ev.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0


def test_probes_on_noise_are_at_chance():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(2000, 5)))
    y = torch.tensor(rng.random(2000) < 0.5)
    w, b = ev.logistic_regression(x[:1000], y[:1000])
    assert abs(ev.roc_auc((x[1000:] @ w + b).numpy(), y[1000:].numpy()) - 0.5) < 0.06
    assert abs(ev.top_k_probe_correct(x[:1000], y[:1000], x[1000:], y[1000:], 2).mean() - 0.5) < 0.06


def test_sgd_probe_keeps_its_best_test_epoch():
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(400, 3)), dtype=torch.float32)
    y = x[:, 0] > 0
    w, b, best = ev.train_probe_sgd(x[:300], y[:300], epochs=30, batch_size=16, lr=1e-2, weight_decay=0.01,
                                    x_test=x[300:], y_test=y[300:])
    assert best == pytest.approx(ev.accuracy(w, b, x[300:], y[300:].numpy())) and best > 0.95
    assert w.shape == (3,)


def test_f1_score():
    assert ev.f1_score([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(2 * 1 / (2 + 2))
    assert ev.f1_score([0, 0], [0, 0]) == 0.0


# ----------------------------------------------------------------------------- §2 absorption

def planted_absorption_case():
    """d = 6, p = e0. Latent 0 is the letter latent (W_dec = e0); latent 1 absorbs the letter for
    some words (W_dec ∝ e0 + e1, cos 0.707); latents 2-5 are orthogonal to p."""
    W_dec = torch.eye(6)
    W_dec[1] = torch.tensor([1.0, 1.0, 0, 0, 0, 0]) / math.sqrt(2)
    latents = torch.tensor([
        [0.0, 2.0, 0, 0, 1.0, 0],   # absorbed: letter latent silent, latent 1 carries the letter
        [0.0, 1.0, 0, 0, 0, 0],     # absorbed
        [0.0, 3.0, 0, 0.5, 0, 0],   # absorbed
        [1.5, 0.0, 0, 0, 0, 0.2],   # clean: the letter latent fires
        [0.5, 1.0, 0, 0, 0, 0],     # partial: both fire
    ])
    return latents @ W_dec, latents, torch.eye(6)[0] * 3.0, W_dec  # x = exact reconstruction


def test_planted_absorbing_latent_gives_the_known_full_absorption():
    x, latents, probe, W_dec = planted_absorption_case()
    full, fraction = ev.word_absorption(x, latents, probe, W_dec, main_latents=[0])
    assert full.tolist() == [True, True, True, False, False]
    # partial word: P = 0.5 + 1/√2, M = 0.5, A = 1/√2 → A / (A + M)
    partial = (1 / math.sqrt(2)) / (1 / math.sqrt(2) + 0.5)
    assert fraction.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, partial])
    summary = ev.aggregate_absorption({0: dict(f1_probe=0.9, n_tp=5, n_full=int(full.sum()),
                                               fraction_sum=float(fraction.sum()), n_main=1)})
    assert summary["mean_full_absorption_score"] == pytest.approx(3 / 5)
    assert summary["mean_absorption_fraction_score"] == pytest.approx((3 + partial) / 5)


def test_clean_letter_latent_gives_no_absorption():
    W_dec = torch.eye(4)
    latents = torch.tensor([[1.0, 0, 0.3, 0], [2.0, 0, 0, 0.1], [0.7, 0.2, 0, 0]])
    full, fraction = ev.word_absorption(latents @ W_dec, latents, torch.eye(4)[0], W_dec, [0])
    assert not full.any() and fraction.abs().sum() == 0


def test_absorption_aggregate_is_an_unweighted_mean_over_letters_passing_the_gate():
    per_letter = {0: dict(f1_probe=0.9, n_tp=10, n_full=5, fraction_sum=6.0, n_main=1),
                  1: dict(f1_probe=0.7, n_tp=2, n_full=0, fraction_sum=0.0, n_main=2),
                  2: dict(f1_probe=0.5, n_tp=50, n_full=50, fraction_sum=50.0, n_main=1),  # gated out
                  3: dict(f1_probe=0.9, n_tp=0, n_full=0, fraction_sum=0.0, n_main=1)}     # no words
    r = ev.aggregate_absorption(per_letter, f1_gate=0.6)
    assert r["letters_kept"] == ["a", "b"]
    assert r["mean_full_absorption_score"] == pytest.approx((0.5 + 0.0) / 2)
    assert r["mean_absorption_fraction_score"] == pytest.approx((0.6 + 0.0) / 2)
    assert r["mean_num_split_features"] == pytest.approx(1.5)


def test_f1_jump_rule_stops_at_the_first_small_gain():
    assert ev.main_latents_from_f1([0.5, 0.52, 0.9], [[3], [3, 4], [3, 4, 5]]) == [3]
    assert ev.main_latents_from_f1([0.5, 0.6, 0.61], [[3], [3, 4], [3, 4, 5]]) == [3, 4]


def test_k_sparse_probing_finds_the_planted_letter_latent():
    # enough words that the batch-4096 L1 probe gets a few hundred Adam steps, as in SAEBench
    rng = np.random.default_rng(6)
    letters = rng.integers(0, 3, size=26000)
    f = np.abs(rng.normal(size=(26000, 12))) * 0.3
    f[:, 7] += 2.0 * (letters == 0)   # latent 7 fires for words starting with "a"
    f[:, 2] += 2.0 * (letters == 1)   # latent 2 for "b"
    f = torch.tensor(f, dtype=torch.float32)
    result = ev.k_sparse_main_latents(f[:24000], letters[:24000], f[24000:], letters[24000:], [0, 1], max_k=3)
    assert result[0][0] == [7] and result[1][0] == [2]
    assert result[0][1][0] == pytest.approx(1.0)


def test_absorption_vocabulary_and_prompt_positions():
    from tokenizers import Tokenizer, models
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "Ġcat", "dog", "▁Apple", "a1", "Ġ", "ĠCafé", "Ġz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    assert ev.absorption_vocabulary(tok) == [(1, " cat", 2), (2, "dog", 3), (3, " Apple", 0), (7, " z", 25)]
    prompt = ev.first_letter_prompt(" cat", [" Apple", "dog"])
    assert prompt == "\n Apple has the first letter: A\ndog has the first letter: D\n cat has the first letter:"
    # with a byte-level BPE the word's own token sits just before the suffix
    import prepare
    bpe = prepare.train_tiny_tokenizer(["the cat has the first letter: C\n dog Apple banana"] * 50)
    words = [e for e in ev.absorption_vocabulary(bpe) if e[1].strip() in ("cat", "dog", "Apple")]
    rows, positions, keep = ev.absorption_prompts(bpe, 0, words, [w for _, w, _ in words], 2, random.Random(0))
    assert keep.sum() >= 2
    kept = [e for e, k in zip(words, keep) if k]
    assert all(row[p] == e[0] and row[0] == 0 and len(row) == p + 1 for row, p, e in zip(rows, positions, kept))


class LetterLM(torch.nn.Module):
    """A stand-in LLM whose residual at a token is its embedding: 3·e_letter (the token's first
    letter) + small noise, so the first letter is linearly readable as in a real model."""

    def __init__(self, embedding):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(embedding)
        self.cfg = SimpleNamespace(pad_token_id=None, eos_token_id=0, bos_token_id=0, d_model=embedding.shape[1])

    def resid_post(self, idx, layer, attention_mask=None, positions=None):
        x = self.embed(idx)
        return x if positions is None else x[torch.arange(len(x)), positions]

    def valid_mask(self, idx, attention_mask=None):
        keep = idx != 0
        return keep if attention_mask is None else keep & attention_mask.bool()


@pytest.mark.parametrize("n_absorbed", [12, 0])
def test_run_absorption_finds_exactly_the_planted_absorbed_words(tmp_path, n_absorbed):
    """40 words per letter. The SAE has one latent per letter (W_dec = e_letter, threshold 2.5);
    the first n_absorbed 'c' words instead sit at 3·(e_c + e_j)/√2, where the 'c' latent stays
    below threshold and a word-specific latent j fires: those words, and only those, are absorbed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({c + "".join(rng.choice(alphabet) for _ in range(5)) for c in alphabet for _ in range(40)})
    vocabulary = ["<|endoftext|>", "has", "the", "first", "letter", ":"] + list(alphabet.upper()) + words
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocabulary)}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    d, eye = 128, torch.eye(128)
    absorbed = [w for w in words if w.startswith("c")][:n_absorbed]
    embedding = torch.zeros(len(vocabulary), d)
    for i, token in enumerate(vocabulary):
        if token.isalpha():
            letter = eye[alphabet.index(token[0].lower())]
            j = absorbed.index(token) if token in absorbed else None
            embedding[i] = 3 * (letter if j is None else (eye[2] + eye[26 + j]) / math.sqrt(2))
    embedding += 0.05 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0))
    W_dec = eye.clone()
    for j in range(n_absorbed):
        W_dec[26 + j] = (eye[2] + eye[26 + j]) / math.sqrt(2)
    s = sae_lib.SAE(d, d, arch="batchtopk", k=4)
    with torch.no_grad():
        s.W_dec.copy_(W_dec), s.W_enc.copy_(W_dec.T), s.b_enc.zero_(), s.b_dec.zero_(), s.threshold.fill_(2.5)
    llm = SimpleNamespace(m=LetterLM(embedding), tokenizer=tokenizer, layer=0, dtype=torch.float32, key=["letters"],
                          cache_dir=str(tmp_path), batch_rows=64)
    cfg = SimpleNamespace(**configurator.defaults(vars(ev)))
    cfg.bootstrap_samples = 100  # the interval is not checked here (tests/test_nulls.py), only the point estimates
    r = ev.run_absorption(llm, [s], cfg)[0]
    per_letter = r["per_letter"]
    assert r["n_letters_kept"] == 26 and per_letter["c"]["main_latents"] == [2]
    assert all(v["n_full"] == 0 for letter, v in per_letter.items() if letter != "c")
    c = per_letter["c"]
    assert set(c["absorbed_words"]) <= set(absorbed) and len(c["absorbed_words"]) == c["n_full"]
    assert (c["n_full"] >= 1) == (n_absorbed > 0)  # ~20% of the 12 planted words are test words
    assert r["mean_full_absorption_score"] == pytest.approx(c["n_full"] / c["n_tp"] / 26)


# ----------------------------------------------------------------------------- §3 sparse probing

def test_sparse_probing_picks_the_planted_latent():
    rng = np.random.default_rng(7)
    y = torch.tensor(rng.random(800) < 0.5)
    f = torch.tensor(np.abs(rng.normal(size=(800, 20))), dtype=torch.float32)
    f[:, 13] += 3.0 * y
    assert ev.top_k_by_mean_difference(f[:600], y[:600], 1).tolist() == [13]
    assert ev.top_k_probe_correct(f[:600], y[:600], f[600:], y[600:], 1).all()


def test_one_vs_rest_balances_negatives_over_the_other_classes():
    labels = ["a"] * 30 + ["b"] * 50 + ["c"] * 50 + ["d"] * 50
    idx, y = ev.one_vs_rest(labels, "a", np.random.default_rng(0))
    assert int(y.sum()) == 30 and len(y) == 60
    negatives = [labels[i] for i in idx[~y]]
    assert sorted(negatives.count(c) for c in "bcd") == [10, 10, 10]


def test_mean_pool_encodes_each_position_before_pooling():
    acts = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 1.0]])
    counts = torch.tensor([2, 1])
    assert torch.allclose(ev.mean_pool(acts, counts), torch.tensor([[2.0, 1.0], [-1.0, 1.0]]))
    s = relu_sae(torch.eye(2), torch.eye(2))  # latents = ReLU(x): pooling first would differ
    assert torch.allclose(ev.mean_pool(acts, counts, s), torch.tensor([[2.0, 2.0], [0.0, 1.0]]))


# ----------------------------------------------------------------------------- §4 SCR, §5 TPP

def scr_planted():
    """x = (class: ±1, attribute: ±1) from four one-hot latents; each text has one token.
    Latents 0/1 = P1/P2 (W_dec ±e0), latents 2/3 = G1/G2 (W_dec ±e1)."""
    W_dec = torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]])
    cells = [(p, g) for p in (0, 1) for g in (0, 1) for _ in range(5)]  # 5 texts per cell
    latents = torch.zeros(len(cells), 4)
    for i, (p, g) in enumerate(cells):
        latents[i, p] = 1.0
        latents[i, 2 + g] = 1.0
    x = latents @ W_dec

    def split(positive):
        y = torch.tensor([positive(c) for c in cells])
        return torch.arange(len(cells)), y

    attribute = split(lambda c: c[1] == 0)
    cls = split(lambda c: c[0] == 0)
    biased_idx = torch.tensor([i for i, c in enumerate(cells) if c in ((0, 0), (1, 1))])
    biased = (biased_idx, torch.tensor([cells[i] == (0, 0) for i in biased_idx]))
    splits = {"attribute": (attribute, attribute), "class": (cls, cls), "biased": (biased, biased)}
    probes = {"attribute": (torch.tensor([0.0, 1.0]), 0.0), "class": (torch.tensor([1.0, 0.0]), 0.0),
              "biased": (torch.tensor([1.0, 2.0]), 0.5)}
    return probes, splits, x, latents, W_dec


def test_scr_ablating_the_planted_attribute_latents_recovers_the_class():
    probes, splits, x, latents, W_dec = scr_planted()
    # biased probe: 0.5 on class labels, 1.0 on attribute labels → direction 1. Ablating both
    # attribute latents leaves x = (±1, 0), where the biased probe is right on every class label:
    # S1 = (1 − 0.5)/(1 − 0.5) = 1. Direction 2's denominator is 1 − 1 = 0 → 0.
    r = ev.scr_scores(probes, splits, x, latents, latents, W_dec, ns=[2, 500])
    assert r[2] == {"scr": 1.0, "dir1": 1.0, "dir2": 0.0}
    assert r[500] == r[2]  # only two latents have a non-zero effect


def test_scr_matches_an_independent_per_token_computation():
    gen = torch.Generator().manual_seed(8)
    n_texts, F_, d = 40, 10, 5
    lengths = torch.randint(2, 6, (n_texts,), generator=gen)
    token_latents = torch.relu(torch.randn(int(lengths.sum()), F_, generator=gen))
    W_dec = torch.nn.functional.normalize(torch.randn(F_, d, generator=gen), dim=1)
    error = 0.1 * torch.randn(int(lengths.sum()), d, generator=gen)
    tokens = token_latents @ W_dec + error
    owner = torch.repeat_interleave(torch.arange(n_texts), lengths)
    pool = lambda t: torch.stack([t[owner == i].mean(0) for i in range(n_texts)])  # noqa: E731
    x, latents = pool(tokens), pool(token_latents)
    labels = {name: torch.rand(n_texts, generator=gen) < 0.5 for name in ("attribute", "class", "biased")}
    splits = {name: ((torch.arange(n_texts), y), (torch.arange(n_texts), y)) for name, y in labels.items()}
    probes = {name: (torch.randn(d, generator=gen), 0.1) for name in labels}
    r = ev.scr_scores(probes, splits, x, latents, latents, W_dec, ns=[1, 3])

    def acc(name, features, on):
        w, b = probes[name]
        return ((features.double() @ w.double() + b > 0) == labels[on]).double().mean().item()

    for n in (1, 3):
        scores = {}
        for direction, ablated, measured in ((1, "attribute", "class"), (2, "class", "attribute")):
            y = labels[ablated]
            effect = ((latents[y].mean(0) - latents[~y].mean(0)) * (W_dec @ probes[ablated][0])).abs()
            chosen = effect.argsort(descending=True)[:n]
            ablated_tokens = tokens - token_latents[:, chosen] @ W_dec[chosen]  # per position
            biased_before, biased_after = acc("biased", x, measured), acc("biased", pool(ablated_tokens), measured)
            denominator = acc(measured, x, measured) - biased_before
            scores[direction] = (biased_after - biased_before) / denominator if denominator >= 1e-3 else 0.0
        chosen_direction = 1 if acc("biased", x, "class") < acc("biased", x, "attribute") else 2
        assert r[n]["dir1"] == pytest.approx(scores[1]) and r[n]["dir2"] == pytest.approx(scores[2])
        assert r[n]["scr"] == pytest.approx(scores[chosen_direction])


def test_tpp_ablating_one_class_latent_hurts_only_its_probe():
    # three classes, one latent each (W_dec = e_c); probe c fires when x_c > 0.5
    per_class = 6
    labels = torch.arange(3).repeat_interleave(per_class)
    latents = torch.nn.functional.one_hot(labels, 3).float()
    W_dec = torch.eye(3)
    x = latents @ W_dec
    probes = {c: (4.0 * torch.eye(3)[c], -2.0) for c in range(3)}
    splits = {}
    for c in range(3):
        idx = torch.arange(len(labels))
        splits[c] = ((idx, labels == c), (idx, labels == c))
    r = ev.tpp_scores(probes, splits, x, latents, latents, W_dec, ns=[1, 20])
    # ablating class i: probe i misses all its positives. Its test split has 6 positives and 12
    # negatives, so accuracy drops from 1 to 12/18; the other probes stay perfect
    for n in (1, 20):
        assert r[n]["intended"] == pytest.approx(1 - 12 / 18)
        assert r[n]["unintended"] == pytest.approx(0.0)
        assert r[n]["tpp"] == pytest.approx(1 - 12 / 18)


def test_saebench_ablation_reproduces_encoding_the_zeroed_padding_rows():
    """ablation_positions="saebench": SAEBench pads each text to ctx rows, zeroes BOS/pad rows and
    still encodes them when ablating (scr_and_tpp/main.py, ablated_precomputed_activations). Here
    that computation is done per row, literally, and compared with the pooled shortcut."""
    gen = torch.Generator().manual_seed(4)
    d, F_, ctx = 6, 10, 8
    W_dec = torch.nn.functional.normalize(torch.randn(F_, d, generator=gen), dim=1)
    b_enc = torch.zeros(F_)
    b_enc[[1, 4]] = 0.7  # latents 1 and 4 fire on the zero vector
    sae = relu_sae(torch.randn(d, F_, generator=gen), W_dec, b_enc=b_enc)
    counts = torch.tensor([3, 7, 5])  # valid positions per text; the rest of ctx is BOS/padding
    acts = torch.randn(int(counts.sum()), d, generator=gen)
    chosen = torch.tensor([1, 2, 4])
    expected = []
    for text in acts.split(counts.tolist()):
        rows = torch.cat([text, torch.zeros(ctx - len(text), d)])  # zeroed rows, still encoded
        with torch.no_grad():
            f = sae.encode(rows)
            error = rows - sae.decode(f)
            f[:, chosen] = 0
            expected.append((sae.decode(f) + error).sum(0) / len(text))
    pooled_x, latents = ev.mean_pool(acts, counts), ev.mean_pool(acts, counts, sae)
    saebench = ev.saebench_ablation_latents(sae, latents, counts, ctx)
    got = ev.ablate(pooled_x, saebench, W_dec, chosen)
    assert torch.allclose(got.float(), torch.stack(expected), atol=1e-5)
    definition = ev.ablate(pooled_x, latents, W_dec, chosen)  # the default: valid positions only
    assert not torch.allclose(definition.float(), torch.stack(expected), atol=1e-3)


def test_headline_labels_name_n_and_the_ablation_used():
    result = {"scr": {"scr_metric": 0.25, "headline_n": 20,
                      "ablation_positions": ev._ABLATION_LABELS["valid"]},
              "tpp": {"tpp_metric": 0.1, "headline_n": 50,
                      "ablation_positions": ev._ABLATION_LABELS["saebench"]},
              "core": {"l0": 8.0, "ce_loss_score": None}}  # null in eval.json: shown as —
    assert compare.headline(result) == [("L0", 8.0), ("CE loss recovered ↑", None), ("SCR (N=20) ↑", 0.25),
                                   ("TPP (N=50, SAEBench ablation) ↑", 0.1)]


def test_eval_json_holds_null_and_a_reason_never_nan(tmp_path, monkeypatch):
    """json.dumps writes NaN as a bare NaN, which is not JSON: a metric that could not be computed
    is written as null, with the metric's reason or what the value was."""
    folder = tmp_path / "k4"
    sae_lib.save(sae_lib.SAE(8, 16, arch="batchtopk", k=4, model="m", layer=0), str(folder))
    nan = float("nan")
    monkeypatch.setattr(ev, "load_llm", lambda *args: SimpleNamespace(m=SimpleNamespace(cfg=SimpleNamespace(d_model=8))))
    monkeypatch.setattr(ev, "computed_from", lambda *args: {"core": {}})  # no model folder "m" to read
    monkeypatch.setitem(ev._RUNNERS, "core", lambda llm, saes, cfg: [
        {"l0": 4.0, "ce_loss_score": nan, "null_reasons": {"ce_loss_score": "0/0"},
         "per_task": {"a": {"auc": float("inf")}}, "curve": [0.5, nan]}])
    cfg = configurator.configure(vars(ev), ["--metrics=['core']"])
    ev.evaluate_group(cfg, "m", 0, "", [str(folder)], "cpu")
    text = (folder / "eval.json").read_text()

    def refuse(constant):
        raise AssertionError(f"eval.json holds {constant}")

    core = json.loads(text, parse_constant=refuse)["core"]
    assert core["ce_loss_score"] is None and core["null_reasons"]["ce_loss_score"] == "0/0"
    assert core["per_task"]["a"] == {"auc": None, "null_reasons": {"auc": "not a finite number (inf)"}}
    assert core["curve"] == [0.5, None] and "curve" in core["null_reasons"] and core["l0"] == 4.0


# ----------------------------------------------------------------------------- §6 OOD

def test_label_encoding_is_sorted_like_label_encoder():
    codes, classes = ev.encode_labels(["not_entailment", "1", "1"])
    assert classes == ["1", "not_entailment"] and codes.tolist() == [1, 0, 0]
    codes, classes = ev.encode_labels(["10", "9", "10"])
    assert classes == ["9", "10"] and codes.tolist() == [1, 0, 1]


def test_find_best_reg_validation_rules():
    (train, val), = ev.validation_splits(np.arange(200) % 2)
    assert val.tolist() == list(range(160, 200)) and train.tolist() == list(range(160))  # last 20%
    (train, val), = ev.validation_splits(np.arange(1000) % 2)
    assert val.tolist() == list(range(900, 1000))                                        # at most 100
    y = np.arange(60) % 3 == 0
    folds = ev.validation_splits(y)
    assert len(folds) == 6 and sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(60))
    assert all(y[v].sum() in (3, 4) for _, v in folds)                                    # stratified
    assert all(len(np.intersect1d(t, v)) == 0 and len(t) + len(v) == 60 for t, v in folds)
    # n ≤ 12: leave two out, only pairs holding both classes
    assert len(ev.validation_splits(np.array([0, 0, 1, 1, 1]))) == 2 * 3


def test_cv_folds_are_sklearns_stratified_kfold_as_sae_probes_uses_it():
    """12 < n < 128: SAE-Probes' get_cv is StratifiedKFold(6, shuffle=True, random_state=42). Its
    folds, traced by hand from sklearn's _make_test_folds: classes numbered by first appearance
    (label 1 first here), sorted codes dealt to folds 0..5 (fold 0 gets two 1s and one 0), each
    class's fold numbers shuffled by RandomState(42): [0 0 4 1 3 2 5] for rows 0-6, then
    [3 0 1 2 5 4] for rows 7-12."""
    y = np.array([1] * 7 + [0] * 6)
    folds = [v.tolist() for _, v in ev.validation_splits(y)]
    assert folds == [[0, 1, 8], [3, 9], [5, 10], [4, 7], [2, 12], [6, 11]]


def test_cv_folds_match_sklearn_when_it_is_installed():
    model_selection = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(5)
    for n in (13, 40, 77, 127):
        y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
        theirs = [val.tolist() for _, val in model_selection.StratifiedKFold(6, shuffle=True, random_state=42).split(y, y)
                  if len(np.unique(y[val])) == 2]
        assert [v.tolist() for _, v in ev.validation_splits(y)] == theirs


def test_ood_probes_on_a_planted_shift():
    rng = np.random.default_rng(9)
    y_id, y_ood = rng.integers(0, 2, 400), rng.integers(0, 2, 200)
    f_id = np.abs(rng.normal(size=(400, 30))) * 0.5
    f_ood = np.abs(rng.normal(size=(200, 30))) * 0.5
    f_id[:, 4] = 2 * y_id + rng.uniform(0, 0.2, 400)
    f_ood[:, 4] = 1 + 0.5 * y_ood + rng.uniform(0, 0.2, 200)  # shifted and shrunk, still ordered: AUC 1
    f_id, f_ood = torch.tensor(f_id, dtype=torch.float32), torch.tensor(f_ood, dtype=torch.float32)
    scores, C = ev.ood_sae_scores(f_id, y_id, f_ood, k=1, pool_rows=300, per_class=100)
    assert ev.roc_auc(scores, y_ood) == 1.0 and C in tuple(np.logspace(5, -5, 10))
    oracle, _ = ev.ood_oracle_scores(f_id, y_id, f_ood, pool_rows=300, per_class=100)
    assert ev.roc_auc(oracle, y_ood) > 0.95
    noise_id, noise_ood = (torch.tensor(rng.normal(size=(n, 30))) for n in (400, 200))
    noise, _ = ev.ood_oracle_scores(noise_id, rng.integers(0, 2, 400), noise_ood, pool_rows=300, per_class=100)
    assert abs(ev.roc_auc(noise, y_ood) - 0.5) < 0.12


# ----------------------------------------------------------------------------- reports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readers_are_not_sent_outside_the_repository():
    """A clone has no notes beside it and no machine paths: what a reader needs is in the repo."""
    files = ["README.md", "evaluate.py", "compare.py", "model.py", "prepare.py", "bench.py", "configurator.py", "sae.py",
             "train.py"]
    files += [os.path.join("configs", name) for name in os.listdir(os.path.join(ROOT, "configs"))]
    for name in files:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for outside in ("../shared", "shared/reference", "/work/", "paper.md", "metrics.md", "training.md",
                        "models.md"):
            assert outside not in text, f"{name} points at {outside}"


def test_readme_promises_the_plot_evaluate_writes_and_git_ignores_exports():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "PNG per metric" not in readme and "`out/comparison.png` (one figure" in readme
    assert "'export/k20'" in readme and "export/" in open(os.path.join(ROOT, ".gitignore")).read().split()


# ----------------------------------------------------------------------------- end to end

def test_main_runs_every_metric_on_the_offline_tiny_default(tmp_path, capsys):
    """prepare.py's tiny default (RANDOM model, stdlib tokenizer), two random SAEs, every metric
    on small settings; then a second run for the comparison table and its cache reuse."""
    import prepare
    data = tmp_path / "data"
    prepare.main([TINY_CONFIG, f"--model_dir={data}/model", f"--tokens_dir={data}/tokens", "--max_tokens=20000",
                  "--val_fraction=0.3", f"--eval_data_dir={tmp_path}/eval"])
    for run, seed in (("base", 0), ("masked", 1)):
        for k in (4, 8):
            s = sae_lib.SAE(128, 64, arch="batchtopk", k=k, seed=seed + k, model=str(data / "model"), layer=2,
                            mask_prob=0.3 * seed)
            with torch.no_grad():
                s.threshold.fill_(0.3)
            sae_lib.save(s, str(tmp_path / run / f"k{k}"))
    small = [TINY_CONFIG, f"--model_dir={data}/model", f"--tokens_dir={data}/tokens", f"--eval_data_dir={tmp_path}/eval", f"--cache_dir={tmp_path}/cache",
             f"--comparison_file={tmp_path}/comparison.md", "--core_tokens=4096", "--core_ce_tokens=2048",
             "--probing_train_per_class=40", "--probing_test_per_class=20", "--scr_train_per_cell=20",
             "--scr_test_per_cell=10", "--ood_pool_rows=150", "--ood_train_per_class=40",
             "--absorption_min_letter_tokens=10", "--absorption_max_words=800", "--ood_max_tokens=64",
             "--probing_ctx=32", "--bootstrap_samples=100"]
    ev.main([str(tmp_path / "base")] + small)
    result = json.load(open(tmp_path / "base" / "k4" / "eval.json"))
    assert set(ev._RUNNERS) <= set(result)
    assert result["core"]["tokens"] > 0 and 0 <= result["core"]["frac_alive"] <= 1
    absorption = result["absorption"]  # the kept letters are those evaluated whose probe passes the F1 gate
    assert absorption["n_letters_kept"] == len(absorption["letters_kept"])
    assert not set(absorption["letters_kept"]) & set(absorption["letters_skipped_too_few_tokens"])
    assert 0 <= result["sparse_probing"]["sae_top_1_test_accuracy"] <= 1
    assert set(result["scr"]["per_run"]) == {"stdlib_docs:asyncio/email", "stdlib_docs:importlib/logging"}
    assert 0 <= result["ood"]["oracle_auc"] <= 1 and "gap_k128" in result["ood"]
    # every headline number has its bootstrap (tests/test_nulls.py); those with a null have it too
    other = json.load(open(tmp_path / "base" / "k8" / "eval.json"))
    for _, metric, key, _ in compare._HEADLINE:
        if metric == "core":
            continue
        u = result[metric]["uncertainty"][key]
        assert u["n_boot"] == len(u["replicates"]) == 100 and u["unit"]
        assert len(other[metric]["uncertainty"][key]["replicates"]) == u["n_boot"]  # paired by replicate
        if metric in ("absorption", "sparse_probing", "ood"):
            assert len(result[metric]["null_uncertainty"][key]["replicates"]) == u["n_boot"]
            assert key in result[metric]["null"] and result[metric]["null"]["l0"] > 0
            assert isinstance(result[metric]["validity"]["testable"], bool)
    cached = sorted(os.listdir(tmp_path / "cache"))
    ev.main([str(tmp_path / "base"), str(tmp_path / "masked")] + small)
    assert sorted(os.listdir(tmp_path / "cache")) == cached  # the second run reused every activation
    table = open(tmp_path / "comparison.md").read()
    assert "| L0 | k4 (nominal k, EMA threshold) |" in table and "mask_prob 0.3" in table  # tests/test_stats.py
    assert "*untestable here*: no SAE with k=20 in every seed of both arms" in table  # the tiny SAEs: k 4, 8
    assert "SCR (N=20) ↑" in table.split("## SCR and TPP: unreliable")[1] and "TPP (N=20) ↑" in table
    plots = ["comparison.png"] if importlib.util.find_spec("matplotlib") else []  # an optional package
    assert sorted(p.name for p in tmp_path.glob("*.png")) == plots  # one figure, as the README says
    os.remove(tmp_path / "comparison.md")
    compare.main([str(tmp_path / "base"), str(tmp_path / "masked"), f"--comparison_file={tmp_path}/comparison.md"])
    assert open(tmp_path / "comparison.md").read() == table  # compare.py alone redoes it from eval.json
    assert result["scr"]["ablation_positions"] == result["tpp"]["ablation_positions"] == ev._ABLATION_LABELS["valid"]
    out = capsys.readouterr().out
    assert "tiny model" in out and "a seeded sample of 800 of the" in out
