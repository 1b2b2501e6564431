"""The baseline-vs-masked statistics of evaluate.py on cases with known answers: t intervals that
cover at their nominal rate, a sign-flip test that finds a real difference and gives uniform
p-values under no difference, matched-L0 interpolation, and comparison.md's contents."""
import math

import numpy as np
import pytest
import torch

import evaluate as ev
import sae as sae_lib


def fake_eval(p, seed, k, l0, ev_global, letters=3, scr_cells=9, absorption=0.1):
    """An eval.json as evaluate.py writes it, with the keys the report reads."""
    return dict(core=dict(l0=l0, explained_variance=ev_global),
                absorption=dict(mean_full_absorption_score=absorption, n_letters_kept=letters,
                                letters_skipped_too_few_tokens=list("xyz")),
                scr=dict(scr_metric=float("nan"), headline_n=20, test_texts_per_cell={"stdlib_docs:a/b": scr_cells}),
                sae=f"out/p{p}_s{seed}/k{k}", settings=dict(absorption_probe_f1_gate=0.6),
                sae_cfg=dict(mask_prob=p, seed=seed, k=k, model="data/tiny/model", layer=1, d_in=128,
                             training_tokens=999_424))


def two_arms(seeds, effect=0.05, l0s=((8, 6.0, 9.2), (16, 11.4, 18.0))):
    """{run folder: {SAE name: eval.json}}: per seed a baseline run and a masked run whose EV is
    `effect` higher at every k; L0s as the issue measured them (baseline below masked)."""
    rng = np.random.default_rng(0)
    runs = {}
    for seed in seeds:
        noise = rng.normal(0, 0.01, len(l0s))
        for p, shift, col in ((0.0, 0.0, 1), (0.3, effect, 2)):
            runs[f"out/p{p}_s{seed}"] = {f"k{k}": fake_eval(p, seed, k, row[col], 0.5 + 0.02 * k + n + shift)
                                         for (k, *_), row, n in zip(l0s, l0s, noise)}
    return runs


def test_t_quantile_matches_the_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)):
        assert ev.t_quantile(df) == pytest.approx(q, abs=1e-4)


def test_a_known_difference_is_found_and_covered():
    rng = np.random.default_rng(1)
    base = {s: v for s, v in enumerate(rng.normal(0.6, 0.05, 8))}
    masked = {s: v + 0.1 + rng.normal(0, 0.005) for s, v in base.items()}
    c = ev.paired_comparison(base, masked)
    mean, lo, hi, n = c["delta"]
    assert n == 8 and lo < 0.1 < hi and hi - lo < 0.02
    assert c["p"] == 2 / 2 ** 8  # exact: only the observed signs and their mirror are as extreme
    assert c["base"][3] == c["other"][3] == 8


def test_equal_arms_give_uniform_p_values():
    rng = np.random.default_rng(2)
    p = np.array([ev.sign_flip_p(rng.normal(0, 1, 10)) for _ in range(400)])
    assert 0.02 <= np.mean(p < 0.05) <= 0.09
    ks = np.max(np.abs(np.sort(p) - np.arange(1, len(p) + 1) / len(p)))  # Kolmogorov-Smirnov distance
    assert ks < 0.1


def test_random_sign_patterns_above_the_exact_limit():
    rng = np.random.default_rng(3)
    # all 20 differences positive: only 2 of 2^20 patterns are as extreme, so nearly no random one is
    assert ev.sign_flip_p(rng.normal(1, 0.1, 20)) <= 3 / (1 + ev._RANDOM_FLIPS)


def test_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(4)
    hits = [lo <= 3.0 <= hi for lo, hi in (ev.mean_interval(rng.normal(3.0, 2.0, 4))[1:3] for _ in range(3000))]
    assert 0.935 <= np.mean(hits) <= 0.965


def test_one_seed_gives_no_interval_and_no_delta():
    md = ev.comparison_report(ev.group_arms(two_arms([0])))
    ev_row = next(line for line in md.splitlines() if line.startswith("| EV (global) ↑ | k8 |"))
    assert "no interval (1 seed)" in ev_row and "[" not in ev_row
    assert "+0.05" not in ev_row  # the one observed difference is not printed as a result
    assert "Fewer than 2 seeds" in md


def test_two_seeds_give_intervals_n_and_p():
    md = ev.comparison_report(ev.group_arms(two_arms([0, 1])))
    row = next(line for line in md.splitlines() if line.startswith("| EV (global) ↑ | k8 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2].endswith("n=2") and "[" in cells[2]
    assert cells[4].startswith("+0.05") and cells[4].endswith("n=2")
    assert cells[5] == "0.5"  # two seeds: exact p can never go below 2/4


def test_interpolation_in_log_l0_on_a_hand_computed_case():
    # log-midpoint of 4 and 16 is 8: halfway between 0.2 and 0.6; log(4) .. log(32) at 8 is 1/3
    got = ev.interpolate_log_l0([16, 4, 32], [0.6, 0.2, float("nan")], [8, 2, 16, 32])
    assert got[0] == pytest.approx(0.4) and math.isnan(got[1]) and got[2] == pytest.approx(0.6)
    assert math.isnan(got[3])  # 32's value is NaN, so 32 lies outside the range with data
    assert ev.interpolate_log_l0([4, 32], [0.0, 0.9], [8])[0] == pytest.approx(0.3)


def test_matched_l0_rows_compare_at_common_l0_only():
    runs = two_arms([0, 1, 2], effect=0.0)
    arms = ev.group_arms(runs)
    grid = ev.matched_l0_grid(arms)
    assert grid == pytest.approx([9.2, math.sqrt(9.2 * 11.4), 11.4])  # inside both arms' [6, 11.4] and [9.2, 18]
    md = ev.comparison_report(arms)
    row = next(line for line in md.splitlines() if line.startswith("| EV (global) ↑ | L0 = 9.2 |"))
    # baseline at L0 9.2, seed 0: between (6.0, EV k8) and (11.4, EV k16) in log(L0)
    base = [r for name, r in runs["out/p0.0_s0"].items()]
    w = math.log(9.2 / 6.0) / math.log(11.4 / 6.0)
    expected = (1 - w) * base[0]["core"]["explained_variance"] + w * base[1]["core"]["explained_variance"]
    at = ev._matched(arms["p=0.0"], "EV (global) ↑", grid)
    assert at[0][0] == pytest.approx(expected)
    assert "n=3" in row
    disjoint = two_arms([0, 1], l0s=((8, 4.0, 20.0), (16, 6.0, 30.0)))
    assert "no data: no L0 range" in ev.comparison_report(ev.group_arms(disjoint))


def test_comparison_md_says_what_it_rests_on():
    md = ev.comparison_report(ev.group_arms(two_arms([0, 1])))
    assert md.startswith("# Baseline vs masked\n\n" + ev._METHOD)
    for text in ("RANDOM MODEL", "`data/tiny/model` layer 1", "2 seed(s) [0, 1]", "999,424",
                 "3–3 letters pass the probe gate", "out of 23 evaluated",
                 'test texts per class × attribute cell: {"stdlib_docs:a/b": 9}',
                 "**No data** (NaN in every SAE, so no row and an empty panel): SCR (N=20) ↑",
                 "Not evaluated (no row, no panel): EV (SAEBench legacy)",
                 "## At matched L0", "| EV (global) ↑ | all k (2 SAEs) |", "mask_prob 0.3"):
        assert text in md, text
    assert "| SCR (N=20) ↑ | k8 |" not in md  # an empty metric is not a row of dashes


def test_arms_are_what_the_cfgs_differ_in_and_pairs_are_unique():
    runs = two_arms([0])
    ablation = {name: dict(r, sae_cfg=dict(r["sae_cfg"], train_on_masked=False)) for name, r in
                runs["out/p0.3_s0"].items()}
    runs["out/p0.3_drop_s0"] = ablation
    for r in runs["out/p0.0_s0"].values():
        r["sae_cfg"]["train_on_masked"] = True
    for r in runs["out/p0.3_s0"].values():
        r["sae_cfg"]["train_on_masked"] = True
    assert list(ev.group_arms(runs)) == ["p=0.0, train_on_masked=True", "p=0.3, train_on_masked=True",
                                         "p=0.3, train_on_masked=False"]
    twice = two_arms([0])
    twice["out/again"] = twice["out/p0.3_s0"]
    with pytest.raises(ValueError, match="train each seed of an arm once"):
        ev.group_arms(twice)


def test_plot_draws_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    ev.plot_comparison(ev.group_arms(two_arms([0, 1])), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# --- the evaluation sample's own noise, and the null a metric is read against

def test_bootstrap_interval_covers_a_known_mean_at_its_nominal_rate():
    # a mean of 200 Bernoulli(0.3) items: the bootstrap's SE is sqrt(p(1-p)/n) and its interval
    # covers the true p in about 95% of samples
    rng = np.random.default_rng(0)
    covered, ses = 0, []
    for trial in range(200):
        items = (rng.random(200) < 0.3).astype(float)
        b = ev.bootstrap(lambda idx: items[idx[0]].mean(), [len(items)], n_boot=400, seed=trial)
        covered += b["ci95"][0] <= 0.3 <= b["ci95"][1]
        ses.append(b["se"])
    assert 0.90 <= covered / 200 <= 0.99
    assert abs(np.mean(ses) - np.sqrt(0.3 * 0.7 / 200)) < 0.003


def test_bootstrap_draws_depend_only_on_seed_and_sizes():
    # two SAEs on one evaluation sample get the same resamples, replicate by replicate
    a, b = np.arange(10.0), np.arange(10.0) * 2
    ra = ev.bootstrap(lambda idx: a[idx[0]].mean() + a[idx[1]].mean(), [10, 10], n_boot=50, seed=3)
    rb = ev.bootstrap(lambda idx: b[idx[0]].mean() + b[idx[1]].mean(), [10, 10], n_boot=50, seed=3)
    assert np.allclose(np.array(rb["replicates"]), 2 * np.array(ra["replicates"]))


def test_calibrated_threshold_gives_the_target_l0():
    # pre-activations uniform on [0, 1] per latent: L0(θ) = F (1 - θ), so θ = 1 - target / F
    torch.manual_seed(0)
    F_, d = 64, 64
    s = sae_lib.SAE(d, F_, arch="batchtopk", k=8)
    with torch.no_grad():
        s.W_enc.copy_(torch.eye(d)); s.W_dec.copy_(torch.eye(d)); s.b_enc.zero_(); s.b_dec.zero_()
    x = torch.rand(20_000, d)
    theta, achieved = sae_lib.calibrate_threshold(s, x, 8.0)
    assert abs(achieved - 8.0) < 0.01 and abs(theta - (1 - 8 / 64)) < 0.005
    s.threshold.fill_(theta)
    assert abs((s.encode(x) > 0).sum(1).float().mean().item() - 8.0) < 0.01


def test_null_sae_has_the_target_l0_and_no_learned_directions():
    x = torch.randn(4000, 32) + 3.0
    trained = sae_lib.SAE(32, 128, arch="matryoshka_batchtopk", k=10, group_fractions=(0.5, 0.5))
    null = ev.null_sae(trained, x, 10.0, seed=1)
    assert null.W_dec.shape == trained.W_dec.shape
    assert torch.allclose(null.W_enc, null.W_dec.T) and torch.allclose(null.W_dec.norm(dim=1), torch.ones(128))
    assert abs((null.encode(x) > 0).sum(1).float().mean().item() - 10.0) < 0.05
