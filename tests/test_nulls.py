"""Tests for the nulls, bootstrap intervals, diagnostics and validity verdicts of evaluate.py's
per-SAE metrics (issue: every number knows its null and its noise), on cases whose answer is known
by construction.

    pytest -q tests/test_nulls.py
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import configurator
import evaluate as ev
import sae as sae_lib


def settings(**changes):
    cfg = SimpleNamespace(**configurator.defaults(vars(ev)))
    cfg.bootstrap_samples = 200
    cfg.absorption_min_letters = 3
    vars(cfg).update(changes)
    return cfg


def letter_harvest(n_absorbed, words_per_letter=10, seed=0, noise=0.05):
    """Three letters in d = 32: a word of letter c sits at 3·e_c (+ small noise off the letter
    dimensions); the first n_absorbed evaluated words of letter 1 sit at 3·(e_1 + e_{10+j})/√2.
    The ground-truth probe is e_c. Train and test prompts hold clean words only."""
    g = torch.Generator().manual_seed(seed)
    d, eye = 32, torch.eye(32)

    def clean(letters):
        x = 3 * eye[torch.as_tensor(letters)]
        x[:, 16:] += noise * torch.randn(len(letters), 16, generator=g)
        return x

    letters_train = np.repeat(np.arange(3), 60)
    letters_test = np.repeat(np.arange(3), 20)
    letters_words = np.repeat(np.arange(3), words_per_letter)
    x_words = clean(letters_words)
    first_b = words_per_letter  # letter 1's words start here
    for j in range(n_absorbed):
        x_words[first_b + j] = 3 * (eye[1] + eye[10 + j]) / math.sqrt(2)
    words = [(i, f" {'abc'[c]}word{i}", int(c)) for i, c in enumerate(letters_words)]
    return SimpleNamespace(x_train=clean(letters_train), letters_train=letters_train, x_test=clean(letters_test),
                           letters_test=letters_test, evaluated=[0, 1, 2], x_words=x_words,
                           letters_words=letters_words, words=words, probe_w=3 * eye[:26],
                           f1_probe={0: 1.0, 1: 1.0, 2: 1.0}, nulls={})


def letter_sae(n_absorbed):
    """Latent c = e_c for the three letters (threshold 2.5: silent on an absorbed word, whose e_1
    share is 3/√2 ≈ 2.1), latent 10+j = the j-th absorbed word's direction; encoder = decoder^T."""
    eye = torch.eye(32)
    W_dec = torch.zeros(32, 32)
    W_dec[:3] = eye[:3]
    for j in range(n_absorbed):
        W_dec[10 + j] = (eye[1] + eye[10 + j]) / math.sqrt(2)
    for f in range(3, 32):  # the rest: unit directions in the noise dimensions, never above threshold
        if not W_dec[f].any():
            W_dec[f] = eye[16 + f % 16]
    s = sae_lib.SAE(32, 32, arch="batchtopk", k=2)
    with torch.no_grad():
        s.W_dec.copy_(W_dec), s.W_enc.copy_(W_dec.T), s.b_enc.zero_(), s.b_dec.zero_(), s.threshold.fill_(2.5)
    return s


@pytest.mark.parametrize("n_absorbed", [4, 0])
def test_a_clean_letter_latent_with_known_absorbed_words_gets_exactly_that_absorption(n_absorbed):
    h, cfg = letter_harvest(n_absorbed), settings()
    r = ev.absorption_result(letter_sae(n_absorbed), h, cfg)
    assert [r["per_letter"][c]["main_latents"] for c in "abc"] == [[0], [1], [2]]
    assert [r["per_letter"][c]["n_full"] for c in "abc"] == [0, n_absorbed, 0]
    assert r["per_letter"]["b"]["absorbed_words"] == [w for _, w, _ in h.words[10:10 + n_absorbed]]
    expected = n_absorbed / 10 / 3  # letter b's rate, averaged over three letters
    assert r["mean_full_absorption_score"] == pytest.approx(expected)
    assert r["mean_absorption_fraction_score"] == pytest.approx(expected)  # M = 0, A = P: fraction 1
    # the main latents are the letters: F1 1 against the ground-truth labels, as is the best single one
    assert r["diagnostics"]["main_latents_f1"] == 1.0 and r["diagnostics"]["best_single_latent_f1"] == 1.0
    assert all(r["per_letter"][c]["main_latents_vs_labels"] == dict(f1=1.0, precision=1.0, recall=1.0) for c in "abc")
    # each absorber has cos 1/√2 with the probe: well clear of the gate plus 2/√32
    clearing = r["diagnostics"]["absorbers_clearing_gate"]
    assert clearing == 1.0 if n_absorbed else math.isnan(clearing)  # no absorbed word: nothing to count
    u = r["uncertainty"]["mean_full_absorption_score"]
    assert len(u["replicates"]) == u["n_boot"] == 200 and u["unit"] == "words within letters"
    assert min(u["replicates"]) >= 0 and max(u["replicates"]) <= 1 / 3
    assert (u["se"] > 0) == (n_absorbed > 0)  # nothing absorbed: every resample scores 0
    flipped = r["uncertainty"]["one_minus_mean_full_absorption"]["replicates"]
    assert flipped == pytest.approx([1 - v for v in u["replicates"]])


def test_absorption_replicates_are_the_score_on_the_same_resampled_words():
    h, cfg = letter_harvest(4), settings(bootstrap_samples=50)
    r = ev.absorption_result(letter_sae(4), h, cfg)
    rng = np.random.default_rng(ev.bootstrap_seed(cfg, "absorption"))
    full_b = np.arange(10) < 4  # letter b's words: the first four absorbed
    for replicate in r["uncertainty"]["mean_full_absorption_score"]["replicates"]:
        draws = [rng.integers(0, 10, 10) for _ in range(3)]
        assert replicate == pytest.approx(full_b[draws[1]].mean() / 3, rel=1e-5)


def test_a_null_sae_scores_at_its_null_and_is_untestable():
    h, cfg = letter_harvest(4), settings(absorption_sensitivity=False)
    null, target = ev.null_for(letter_sae(4), h.x_train, cfg)
    assert target == pytest.approx(1.0)  # one letter latent per clean word
    r = ev.absorption_result(null, h, cfg)
    assert r["null"]["l0"] == pytest.approx(ev.l0(ev.encode(null, h.x_train)))
    for key in ev._ABSORPTION_KEYS:
        assert r[key] == pytest.approx(r["null"][key])
        assert r["uncertainty"][key]["replicates"] == pytest.approx(r["null_uncertainty"][key]["replicates"])
    assert not r["validity"]["testable"]
    assert any("not clearly below its null" in reason for reason in r["validity"]["reasons"])


def test_planted_absorption_above_a_null_that_absorbs_nothing_is_untestable():
    """Clean words with one latent each: the null's random latents at L0 1 fire the same latent on
    every word of a letter, so it absorbs nothing, and the planted SAE's 4/30 is not below it."""
    h, cfg = letter_harvest(4), settings(absorption_sensitivity=False)
    r = ev.absorption_result(letter_sae(4), h, cfg)
    assert r["null"]["mean_full_absorption_score"] == 0.0 and r["null"]["l0"] == pytest.approx(1.0)
    assert r["null_minus_score_ci95"][1] < 0  # null − score: clearly negative
    assert r["validity"]["reasons"] == [f"score not clearly below its null (null − score 95% interval "
                                        f"{ev._interval(r['null_minus_score_ci95'])})"]


def test_absorption_validity_rule_on_paired_replicates():
    def r(score, null, f1=0.9, letters=20):
        key = "mean_full_absorption_score"
        return {"uncertainty": {key: dict(replicates=list(score))}, "null": {key: float(np.mean(null))},
                "null_uncertainty": {key: dict(replicates=list(null))},
                "diagnostics": dict(main_latents_f1=f1), "n_letters_kept": letters}

    cfg = settings(absorption_min_letters=20)
    base = np.linspace(0.1, 0.3, 100)
    assert ev._absorption_validity(r(base, base + 0.05), cfg) == dict(testable=True, reasons=[])
    # the same gap but unpaired noise of ±0.1 around it: the interval of null − score reaches 0
    shuffled = np.random.default_rng(0).permutation(base)
    assert not ev._absorption_validity(r(base, shuffled + 0.05), cfg)["testable"]
    reasons = ev._absorption_validity(r(base, base + 0.05, f1=0.3, letters=12), cfg)["reasons"]
    assert reasons == ["main latents' F1 against the letter labels 0.30 < 0.5", "12 letters pass the probe gate (< 20)"]


def test_absorption_untestable_when_the_main_latents_miss_the_letters():
    h, cfg = letter_harvest(0), settings(absorption_min_main_f1=1.01, absorption_sensitivity=True)
    r = ev.absorption_result(letter_sae(0), h, cfg)
    assert any("main latents' F1" in reason for reason in r["validity"]["reasons"])
    assert set(r["sensitivity"]) == {"centred_projection", "scale_normalised_probe", "probe_seed_plus_1"}
    assert "centred" in r["sensitivity_how"]
    assert r["sensitivity"]["probe_seed_plus_1"] == 0.0  # nothing absorbed, whatever the probe's seed
    # the centred row keeps the primary main latents: the same as refitting the probe with its seed
    h = letter_harvest(4)
    r = ev.absorption_result(letter_sae(4), h, cfg)
    refit = ev.absorption_of_sae(letter_sae(4), h, cfg, centre=h.x_train.double().mean(0))
    assert r["sensitivity"]["centred_projection"] == ev.aggregate_absorption(refit)["mean_full_absorption_score"] > 0


def test_latent_f1_precision_recall():
    assert ev.latent_f1([1, 1, 0, 0], [1, 0, 1, 0]) == dict(f1=0.5, precision=0.5, recall=0.5)
    assert ev.latent_f1([0, 0], [1, 0]) == dict(f1=0.0, precision=0.0, recall=0.0)
    f = torch.tensor([[1.0, 0, 1], [1.0, 0, 0], [0, 1.0, 0]])
    assert ev.best_single_latent_f1(f, np.array([1, 1, 0], bool), f, np.array([1, 1, 0], bool)) == (0, 1.0)


def test_bootstrap_seed_depends_on_the_metric_only():
    cfg = settings()
    assert ev.bootstrap_seed(cfg, "ood") == ev.bootstrap_seed(settings(), "ood") != ev.bootstrap_seed(cfg, "scr")
    assert ev.bootstrap_seed(cfg, "ood") != ev.bootstrap_seed(settings(eval_seed=1), "ood")


def test_ood_oracle_near_chance_is_flagged_and_untestable():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    perfect, noise = y + 0.01 * rng.normal(size=200), rng.normal(size=200)
    cfg = settings(ood_ks=[128])

    def result(oracles):
        per_task = {f"t{i}": dict(oracle_auc=ev.roc_auc(o, y), sae_auc_k128=ev.roc_auc(perfect, y),
                                  null_auc_k128=ev.roc_auc(noise, y)) for i, o in enumerate(oracles)}
        boot = [(y, dict(oracle=o, k128=perfect)) for o in oracles]
        null_boot = [(y, dict(oracle=o, k128=noise)) for o in oracles]
        return ev._ood_result(per_task, boot, null_boot, "a null", 10.0, cfg)

    good = result([perfect, perfect])
    assert good["validity"]["testable"] and good["validity"]["datasets_near_chance"] == []
    assert good["uncertainty"]["sae_auc_k128"]["ci95"] == [1.0, 1.0] and good["gap_k128"] == 0.0
    assert abs(good["null"]["sae_auc_k128"] - 0.5) < 0.1 and good["null"]["l0"] == 10.0
    mixed = result([perfect, noise])
    assert mixed["validity"]["datasets_near_chance"] == ["t1"] and mixed["per_task"]["t1"]["oracle_near_chance"]
    bad = result([noise, noise])
    assert not bad["validity"]["testable"] and "mean oracle AUC near chance" in bad["validity"]["reasons"][0]
    # the gap's replicates are oracle − SAE on one resample
    g = np.array(mixed["uncertainty"]["gap_k128"]["replicates"])
    o = np.array(mixed["uncertainty"]["oracle_auc"]["replicates"])
    s = np.array(mixed["uncertainty"]["sae_auc_k128"]["replicates"])
    assert g == pytest.approx(o - s, abs=1e-5)


def test_ablation_replicates_reweight_the_test_texts():
    """SCR / TPP replicate b is the score with each test text counted as often as draw b took it:
    a score that is the weighted share of 'good' texts gives that share's bootstrap exactly."""
    good = np.array([1, 1, 0, 0, 1, 0], float)
    strata = [np.arange(3), np.arange(3, 6)]
    cfg = settings(bootstrap_samples=30, headline_n=20)

    def score(x, ns, weights=None):
        return {n: dict(scr=weights @ good / weights.sum(-1)) for n in ns}  # weights: (n_boot, n_test)

    u = ev.ablation_replicates([(None, None, good, strata)], lambda *a, **k: score(a[2], a[-1], **k), cfg, "scr", "t")
    rng = np.random.default_rng(ev.bootstrap_seed(cfg, "scr"))
    for replicate in u["replicates"]:
        rows = np.concatenate([s[rng.integers(0, 3, 3)] for s in strata])
        assert replicate == pytest.approx(good[rows].mean(), rel=1e-5)


def test_resampled_auc_is_roc_auc_on_the_drawn_rows():
    rng = np.random.default_rng(3)
    scores, y = np.round(rng.normal(size=60), 1), rng.integers(0, 2, 60)  # rounded: many ties
    auc = ev.resampled_auc(scores, y)
    for _ in range(20):
        rows = rng.integers(0, 60, 60)
        assert auc(rows) == pytest.approx(ev.roc_auc(scores[rows], y[rows]), abs=1e-12)
    assert math.isnan(auc(np.flatnonzero(y == 1)))


@pytest.mark.parametrize("metric", ["scr", "tpp"])
def test_scr_and_tpp_replicates_are_the_score_on_each_draws_text_counts(metric):
    """All replicates at once (2-D weights) give what the score gives on each draw's counts alone."""
    rng = np.random.default_rng(1)
    d, F, n = 8, 12, 40
    x_train, x_test = torch.randn(n, d), torch.randn(n, d)
    f_train, f_test = torch.relu(torch.randn(n, F)), torch.relu(torch.randn(n, F))
    W_dec = torch.randn(F, d)
    if metric == "scr":
        names, score = ("attribute", "class", "biased"), ev.scr_scores
    else:
        names, score = ("a", "b", "c"), ev.tpp_scores
    labels = np.repeat(np.arange(4), n // 4)
    splits = {name: ((torch.as_tensor(rng.permutation(n)[:20]), torch.as_tensor(rng.random(20) < 0.5)),
                     (torch.as_tensor(rng.permutation(n)[:30]), torch.as_tensor(rng.random(30) < 0.5)))
              for name in names}
    probes = {name: (torch.randn(d), 0.1) for name in names}
    strata = [np.flatnonzero(labels == c) for c in range(4)]
    cfg = settings(bootstrap_samples=25, headline_n=3)
    args = (probes, splits, x_test, f_train, f_test, W_dec)
    u = ev.ablation_replicates([args + (strata,)], score, cfg, metric, "texts")
    draws = np.random.default_rng(ev.bootstrap_seed(cfg, metric))
    for replicate in u["replicates"]:
        weights = np.zeros(n)
        for s in strata:
            np.add.at(weights, s[draws.integers(0, len(s), len(s))], 1)
        assert replicate == pytest.approx(score(*args, [3], weights=weights)[3][metric], rel=1e-5, abs=1e-9)
    assert np.isfinite(u["replicates"]).all() and u["se"] > 0


def planted_texts(rng, n, dims, flipped=0, d=64, noise=1.0):
    """n one-token texts of each class "a", "b": x = 3·e_dims[class] + N(0, noise²), except that the
    first `flipped` texts of each class carry the other class's direction."""
    x = torch.tensor(rng.normal(size=(2 * n, d)) * noise, dtype=torch.float32)
    for i in range(2 * n):
        c = i // n
        x[i, dims[1 - c if i % n < flipped else c]] += 3
    return SimpleNamespace(acts=x, counts=torch.ones(2 * n, dtype=torch.long), pooled=x, labels=["a"] * n + ["b"] * n)


def identity_sae(d):
    """Latent c reads and writes e_c, threshold 1.5: it fires where a planted direction is."""
    s = sae_lib.SAE(d, d, arch="batchtopk", k=2)
    with torch.no_grad():
        s.W_dec.copy_(torch.eye(d)), s.W_enc.copy_(torch.eye(d)), s.b_enc.zero_(), s.b_dec.zero_(), s.threshold.fill_(1.5)
    return s


def planted_probing(monkeypatch, n_per_class=100, d=64):
    """Two classes of one-token texts, x = 3·e_class + N(0, 1); the SAE's latent c reads e_c."""
    rng = np.random.default_rng(5)
    train, test = planted_texts(rng, 2 * n_per_class, (0, 1), d=d), planted_texts(rng, n_per_class, (0, 1), d=d)
    splits = {c: (ev.one_vs_rest(train.labels, c, rng), ev.one_vs_rest(test.labels, c, rng)) for c in "ab"}
    monkeypatch.setattr(ev, "probing_data", lambda llm, cfg, task, name: (train, test, splits))
    return identity_sae(d), train


def test_sparse_probing_a_letter_sae_is_above_its_null_and_a_null_is_at_it(monkeypatch):
    s, train = planted_probing(monkeypatch)
    cfg = settings(probing_tasks=[("planted", "none", ["a", "b"])], probing_ks=[1])
    r = ev.run_sparse_probing(None, [s], cfg)[0]
    assert r["sae_top_1_test_accuracy"] > 0.9 and r["validity"] == dict(testable=True, reasons=[])
    assert r["null"]["l0"] == pytest.approx(ev.l0(ev.encode(s, train.acts)))
    assert r["null"]["sae_top_1_test_accuracy"] < r["sae_top_1_test_accuracy"] - 0.1
    u, n = r["uncertainty"]["sae_top_1_test_accuracy"], r["null_uncertainty"]["sae_top_1_test_accuracy"]
    assert u["unit"] == "test texts within classes" and len(u["replicates"]) == len(n["replicates"]) == 200
    null = ev.null_for(s, train.acts, cfg)[0]
    r_null = ev.run_sparse_probing(None, [null], cfg)[0]
    assert r_null["sae_top_1_test_accuracy"] == pytest.approx(r_null["null"]["sae_top_1_test_accuracy"])
    assert not r_null["validity"]["testable"] and "not clearly above its null" in r_null["validity"]["reasons"][0]


def test_several_binary_tasks_score_one_split_each_and_their_bootstrap_spans_them(monkeypatch):
    """Two binary tasks: one clean (top-1 accuracy 1), one whose test texts are a quarter
    flipped (0.75): the score is their mean, 0.875, each scored on one split (the other class's
    is the same split mirrored), and replicate b is the mean of the two tasks' accuracies on the
    test texts it draws within each class."""
    rng = np.random.default_rng(0)
    tasks = {"clean": (planted_texts(rng, 100, (0, 1), noise=0.1), planted_texts(rng, 40, (0, 1), noise=0.1)),
             "quarter_flipped": (planted_texts(rng, 100, (2, 3), noise=0.1),
                                 planted_texts(rng, 40, (2, 3), flipped=10, noise=0.1))}

    def probing_data(llm, cfg, task, name):
        train, test = tasks[name]
        return train, test, {c: (ev.one_vs_rest(train.labels, c, rng), ev.one_vs_rest(test.labels, c, rng))
                             for c in "ab"}

    dense_fits = []
    monkeypatch.setattr(ev, "probing_data", probing_data)
    monkeypatch.setattr(ev, "dense_probe_accuracy", lambda *args: dense_fits.append(args) or 1.0)
    cfg = settings(probing_tasks=[(name, "none", ["a", "b"]) for name in tasks], probing_ks=[1], bootstrap_samples=50)
    r = ev.run_sparse_probing(None, [identity_sae(64)], cfg)[0]
    assert [r["per_task"][name]["sae_top_1_test_accuracy"] for name in tasks] == [1.0, 0.75]
    assert r["sae_top_1_test_accuracy"] == 0.875
    assert len(dense_fits) == 2 * 2  # per task the residual's probe and the SAE's, on one split
    correct = {"clean": np.ones(80, bool), "quarter_flipped": np.arange(80) % 40 >= 10}
    draws = np.random.default_rng(ev.bootstrap_seed(cfg, "sparse_probing"))
    for replicate in r["uncertainty"]["sae_top_1_test_accuracy"]["replicates"]:
        drawn = {name: np.concatenate([draws.integers(0, 40, 40) + 40 * c for c in range(2)]) for name in tasks}
        assert replicate == pytest.approx(np.mean([correct[name][drawn[name]].mean() for name in tasks]), abs=1e-5)
