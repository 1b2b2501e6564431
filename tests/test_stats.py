"""The across-run statistics of compare.py on cases with known answers: two-level intervals (seeds
and the evaluation sample) that cover at their nominal rate, Holm's correction, verdicts that
cannot overclaim, matched-L0 interpolation, comparison.md's contents, and a compare.py that never
imports torch."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import compare
import evaluate as ev
import sae as sae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 200  # bootstrap replicates per metric in the fake eval.json files


def fake_eval(p, seed, k, l0, ev_global, absorption=0.7, gap=0.05, sample=None, d_in=128, calibrated=False,
              testable=True, letters=15):
    """An eval.json as evaluate.py writes it, with the keys the report reads. sample: the evaluation
    sample's deviation in each bootstrap replicate (one array shared by every SAE: replicate b is the
    same resample for all of them); the replicates are the value plus it."""
    sample = np.zeros(B) if sample is None else sample

    def uncertainty(value, key):
        reps = (value + sample).tolist()
        return {key: dict(se=float(np.std(reps)), ci95=[min(reps), max(reps)], n_boot=B, unit="items", replicates=reps)}

    validity = dict(testable=testable, reasons=[] if testable else ["score not clearly below its null"])
    return dict(core=dict(l0=l0, explained_variance=ev_global),
                absorption=dict(mean_full_absorption_score=absorption, n_letters_kept=letters,
                                letters_skipped_too_few_tokens=list("xyz"),
                                uncertainty=uncertainty(absorption, "mean_full_absorption_score"),
                                null=dict(mean_full_absorption_score=0.45, l0=l0, how="random unit rows"),
                                validity=validity),
                ood=dict(gap_k128=gap, uncertainty=uncertainty(gap, "gap_k128"), null=dict(gap_k128=0.15),
                         validity=dict(testable=True, reasons=[])),
                scr=dict(scr_metric=float("nan"), headline_n=20, test_texts_per_cell={"stdlib_docs:a/b": 9}),
                tpp=dict(tpp_metric=0.1, headline_n=20),
                sae=f"out/p{p}_s{seed}/k{k}", settings=dict(absorption_probe_f1_gate=0.6),
                sae_cfg=dict(mask_prob=p, seed=seed, k=k, model="data/tiny/model", layer=1, d_in=d_in,
                             training_tokens=999_424, threshold_used="calibrated" if calibrated else "ema",
                             # train.py's calibration records, different in every SAE: never an arm of their own
                             threshold_ema=0.5 + 0.01 * seed + 0.001 * k, calibration_l0_ema=1.3 * l0))


def two_arms(seeds, effect=0.05, l0s=((20, 26.0, 28.0), (80, 66.0, 70.0)), calibrated=False, d_in=640,
             absorption_effect=0.0, testable=True):
    """{run folder: {SAE name: eval.json}}: per seed a baseline run and a masked run whose EV is
    `effect` higher at every k; at calibrated L0 both arms sit at L0 = k."""
    rng = np.random.default_rng(0)
    sample = rng.normal(0, 0.01, B)
    runs = {}
    for seed in seeds:
        noise = rng.normal(0, 0.01, len(l0s))
        for p, shift, col in ((0.0, 0.0, 1), (0.3, effect, 2)):
            arm_noise = rng.normal(0, 0.01, len(l0s))  # each SAE's own: the seed-level spread of a Δ
            runs[f"out/p{p}_s{seed}"] = {
                f"k{k}": fake_eval(p, seed, k, float(k) if calibrated else row[col], 0.5 + 0.002 * k + n + shift,
                                   absorption=0.7 + n + a + (absorption_effect if p else 0.0), gap=0.05 + a / 10,
                                   sample=sample, d_in=d_in, calibrated=calibrated, testable=testable)
                for (k, *_), row, n, a in zip(l0s, l0s, noise, arm_noise)}
    return runs


def test_t_quantile_matches_the_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)):
        assert compare.t_quantile(df) == pytest.approx(q, abs=1e-4)


def simulate(rng, n_seeds, mu, seed_sd, item_sd, items=100):
    """Per seed a value measured on ONE evaluation sample of `items` items shared by every seed, and
    its bootstrap replicates (the same resamples for every seed): value = mu + seed effect + mean of
    the items' noise. Returns ({seed: value}, {seed: replicates}, the seed effects)."""
    x = rng.normal(0, item_sd, items)
    idx = rng.integers(0, items, (B, items))
    effects = rng.normal(0, seed_sd, n_seeds)
    values = {s: mu + e + x.mean() for s, e in enumerate(effects)}
    reps = {s: mu + e + x[idx].mean(1) for s, e in enumerate(effects)}
    return values, reps, effects


@pytest.mark.parametrize("n_seeds", [1, 4])
def test_two_level_interval_covers_at_its_nominal_rate(n_seeds):
    # seed spread and evaluation sample comparable (SE of the sample mean 0.02, seed sd 0.03); with one
    # seed the interval is the sample's alone and covers that seed's value on the whole population
    rng = np.random.default_rng(0)
    hits, hows = [], set()
    for _ in range(1500):
        values, reps, effects = simulate(rng, n_seeds, 0.3, 0.03, 0.2)
        s = compare.two_level(values, reps)
        truth = 0.3 + (effects[0] if n_seeds == 1 else 0.0)
        hits.append(s["lo"] <= truth <= s["hi"])
        hows.add(s["how"])
    assert 0.93 <= np.mean(hits) <= 0.97
    assert hows == {"evaluation sample only (1 seed)" if n_seeds == 1 else "seeds + evaluation sample"}


def test_seeds_alone_undercover_when_the_sample_is_shared():
    # the evaluation sample is common to every seed, so its error does not average out: an interval
    # from the seeds' spread alone misses far more than 5%
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(500):
        values, _, _ = simulate(rng, 4, 0.3, 0.01, 0.3)
        s = compare.two_level(values, {s: None for s in values})
        hits.append(s["lo"] <= 0.3 <= s["hi"])
        assert s["how"].startswith("seeds only")
    assert np.mean(hits) < 0.8


def test_a_paired_delta_cancels_the_shared_sample():
    # both arms measured on the same sample: replicate b against replicate b removes its noise, so
    # the Δ interval is far narrower than either arm's
    rng = np.random.default_rng(2)
    sample = rng.normal(0, 0.05, B)
    base = {s: (0.5 + e, 0.5 + e + sample) for s, e in enumerate(rng.normal(0, 0.002, 3))}
    other = {s: (v + 0.01, r + 0.01) for s, (v, r) in base.items()}
    c = compare.paired(base, other)
    assert c["delta"]["mean"] == pytest.approx(0.01) and c["delta"]["hi"] - c["delta"]["lo"] < 1e-9
    assert c["base"]["hi"] - c["base"]["lo"] > 0.1 and c["delta"]["p"] == 0.0
    assert compare.paired({0: (0.5, None)}, {0: (0.6, None)})["delta"]["how"] == "n=1; no interval"


def test_holm_on_a_hand_computed_case():
    assert compare.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert compare.holm([None, 0.02]) == [None, 0.02]


def test_excludes_never_comes_from_an_interval_overlapping_the_papers_range():
    paper = (-0.0375, -0.0235)
    rng = np.random.default_rng(3)
    for lo, width in zip(rng.uniform(-0.1, 0.05, 5000), rng.uniform(0, 0.08, 5000)):
        for resolved in (False, True):
            v = compare.verdict(lo, lo + width, paper, resolved)
            overlaps = lo <= paper[1] and lo + width >= paper[0]
            assert (v == "excludes the paper's effect") == (not overlaps)
    assert compare.verdict(-0.03, -0.025, paper, True) == "consistent with the paper's effect"
    assert compare.verdict(-0.05, 0.02, paper, False) == "no difference resolved"
    assert compare.verdict(-0.005, 0.005, paper, False) == "excludes the paper's effect"  # too small to be it
    assert compare.verdict(-0.03, -0.025, paper, True, ["too few letters"]) == "untestable here"


def test_interpolation_in_log_l0_on_a_hand_computed_case():
    # log-midpoint of 4 and 16 is 8: halfway between 0.2 and 0.6; log(4) .. log(32) at 8 is 1/3
    got = compare.interpolate_log_l0([16, 4, 32], [0.6, 0.2, float("nan")], [8, 2, 16, 32])
    assert got[0] == pytest.approx(0.4) and math.isnan(got[1]) and got[2] == pytest.approx(0.6)
    assert math.isnan(got[3])  # 32's value is NaN, so 32 lies outside the range with data
    assert compare.interpolate_log_l0([4, 32], [0.0, 0.9], [8])[0] == pytest.approx(0.3)


def test_calibrated_runs_are_compared_at_equal_k_with_verdicts_first():
    md = compare.comparison_report(compare.group_arms(two_arms([0, 1, 2], calibrated=True)))
    assert md.startswith("# Baseline vs masked\n\n## Verdicts on the primary endpoints")
    verdict_lines = [line for line in md.split("## What")[0].splitlines() if line.startswith("- **")]
    assert [line.split("**")[1] for line in verdict_lines] == [
        "Mean full absorption ↓ at L0 20", "Mean full absorption ↓ at L0 80",
        "OOD gap to oracle (k=128) ↓ at L0 20", "OOD gap to oracle (k=128) ↓ at L0 80"]
    assert all("(calibrated L0; L0 on clean text 20.0 / 20.0)" in line or "80.0 / 80.0" in line for line in verdict_lines)
    # no absorption effect: Δ = 0 ± the seeds' noise: no difference resolved, the width said
    assert "*no difference resolved*" in verdict_lines[0] and "× the paper's largest effect" in verdict_lines[0]
    assert "Holm p" in verdict_lines[0]
    headline = md[md.index("| metric | at |"):md.index("## What")]
    row = next(line for line in headline.splitlines() if line.startswith("| EV (global) ↑ | k20 (calibrated) |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert "[" in cells[2] and cells[3] == "—" and cells[6].startswith("+0.05") and cells[-1] == "3"
    absorption = next(line for line in headline.splitlines() if line.startswith("| Mean full absorption ↓ | k20"))
    assert "| 0.4500 |" in absorption  # the null beside the value
    assert "not needed: every SAE is at calibrated L0" in md and "RANDOM" not in md  # d_in 640
    assert "## SCR and TPP: unreliable" in md and "arXiv 2605.18229" in md
    assert "| TPP (N=20) ↑ | k20" in md.split("## SCR and TPP")[1] and "TPP" not in md.split("## SCR and TPP")[0].split("## Every metric")[1]
    assert "15 letters pass" in md and "15–15" not in md and "n=1" not in md


def test_one_seed_says_once_that_intervals_are_the_samples_alone():
    md = compare.comparison_report(compare.group_arms(two_arms([0], calibrated=True)))
    assert md.count("n=1 seed: every interval is the evaluation sample's alone") == 1
    assert "(n=1" not in md and "no interval (1 seed)" not in md
    assert "evaluation sample only (1 seed), n=1" in md  # in each verdict line
    assert "no interval anywhere" not in md and "Rows without an interval are metrics with one seed" in md  # EV


def test_an_untestable_endpoint_says_why_and_a_real_effect_is_found():
    md = compare.comparison_report(compare.group_arms(two_arms([0, 1, 2], calibrated=True, testable=False)))
    # absorption at 20 and 80: the reason once, with the number of SAEs it holds for (3 seeds x 2 arms)
    assert md.count("*untestable here*: score not clearly below its null (6 of 6 SAEs).") == 2
    runs = two_arms([0, 1, 2], calibrated=True, testable=False)
    for i, r in enumerate(r for run in runs.values() for r in run.values()):  # each SAE its own figure
        r["absorption"]["validity"]["reasons"] = [f"main latents' F1 against the letter labels 0.0{i} < 0.5"]
    md = compare.comparison_report(compare.group_arms(runs))
    assert md.count("*untestable here*: main latents' F1 against the letter labels 0.00 < 0.5 (6 of 6 SAEs; "
                    "the first shown).") == 1  # at L0 20; one entry, not six
    runs = two_arms([0, 1, 2, 3], calibrated=True)
    for run in runs.values():  # every seed alike, masked 0.03 lower: the paper's effect, no noise but the sample's
        for r in run.values():
            r["absorption"]["mean_full_absorption_score"] = 0.7 - (0.03 if r["sae_cfg"]["mask_prob"] else 0.0)
            r["ood"]["gap_k128"] = 0.05
    arms = compare.group_arms(runs)
    endpoints = compare.verdicts(arms)["p=0.3"]
    assert endpoints[0]["verdict"] == "consistent with the paper's effect"
    # OOD: Δ exactly 0 on every seed, and the shared sample cancels: [0, 0] touches the open end 0 of
    # the paper's range [-0.024, 0), so it is not excluded, and nothing is resolved
    assert endpoints[2]["verdict"] == "no difference resolved"


def test_nominal_k_runs_are_the_papers_framing_and_get_matched_l0_rows():
    runs = two_arms([0, 1, 2], effect=0.0)
    arms = compare.group_arms(runs)
    md = compare.comparison_report(arms)
    assert "nominal k, EMA threshold (the paper's framing); L0 on clean text 26.0 / 28.0" in md
    assert "| EV (global) ↑ | k20 (nominal k, EMA threshold) |" in md
    grid = compare.matched_l0_grid(arms)
    assert grid == pytest.approx([28.0, math.sqrt(28.0 * 66.0), 66.0])  # inside both arms' [26, 66] and [28, 70]
    at = compare._matched(arms["p=0.0"], "EV (global) ↑", grid)
    base = list(runs["out/p0.0_s0"].values())
    w = math.log(28.0 / 26.0) / math.log(66.0 / 26.0)
    expected = (1 - w) * base[0]["core"]["explained_variance"] + w * base[1]["core"]["explained_variance"]
    assert at[0][0][0] == pytest.approx(expected)
    absorption = compare._matched(arms["p=0.0"], "Mean full absorption ↓", grid)[0][0]  # seed 0, L0 28
    reps = [np.array(r["absorption"]["uncertainty"]["mean_full_absorption_score"]["replicates"]) for r in base]
    assert absorption[1].shape == (B,)
    assert np.allclose(absorption[1], (1 - w) * reps[0] + w * reps[1])  # each replicate interpolated too
    assert "| EV (global) ↑ | L0 = 28.0 |" in md
    disjoint = two_arms([0, 1], l0s=((20, 4.0, 20.0), (80, 6.0, 30.0)))
    assert "no data: no L0 range" in compare.comparison_report(compare.group_arms(disjoint))


def test_comparison_md_says_what_it_rests_on():
    md = compare.comparison_report(compare.group_arms(two_arms([0, 1], d_in=128)))
    for text in ("RANDOM MODEL", "`data/tiny/model` layer 1", "2 seed(s) [0, 1]", "999,424",
                 "inference threshold ema", "out of 23 evaluated",
                 'test texts per class × attribute cell: {"stdlib_docs:a/b": 9}',
                 "**No data** (NaN in every SAE, so no row and an empty panel): SCR (N=20) ↑",
                 "Not evaluated (no row, no panel): EV (SAEBench legacy)",
                 "| EV (global) ↑ | all k (2 SAEs) |", "mask_prob 0.3", compare._METHOD):
        assert text in md, text
    assert "| SCR (N=20) ↑ | k20" not in md  # an empty metric is not a row of dashes


def test_old_eval_json_without_the_new_fields_still_reports():
    runs = two_arms([0, 1])
    for run in runs.values():
        for r in run.values():
            for metric in ("absorption", "ood"):
                for key in ("uncertainty", "null", "validity"):
                    r[metric].pop(key)
            r["sae_cfg"].pop("threshold_used")
    md = compare.comparison_report(compare.group_arms(runs))
    assert "those intervals are the seeds' spread alone" in md and "seeds only" in md


def test_arms_are_what_the_cfgs_differ_in_and_pairs_are_unique():
    runs = two_arms([0])
    ablation = {name: dict(r, sae_cfg=dict(r["sae_cfg"], train_on_masked=False)) for name, r in
                runs["out/p0.3_s0"].items()}
    runs["out/p0.3_drop_s0"] = ablation
    for r in runs["out/p0.0_s0"].values():
        r["sae_cfg"]["train_on_masked"] = True
    for r in runs["out/p0.3_s0"].values():
        r["sae_cfg"]["train_on_masked"] = True
    runs["out/p0.3_unigram_s0"] = {name: dict(r, sae_cfg=dict(r["sae_cfg"], mask_replacement="unigram"))
                                   for name, r in runs["out/p0.3_s0"].items()}
    # each arm named by mask_prob and what differs from the first run
    assert list(compare.group_arms(runs)) == ["p=0.0", "p=0.3", "p=0.3, train_on_masked=False",
                                              "p=0.3, mask_replacement=unigram"]
    twice = two_arms([0])
    twice["out/again"] = twice["out/p0.3_s0"]
    with pytest.raises(ValueError, match="train each seed of an arm once"):
        compare.group_arms(twice)


def test_plot_draws_one_panel_per_primary_metric_and_ev(tmp_path):
    pytest.importorskip("matplotlib")
    compare.plot_comparison(compare.group_arms(two_arms([0, 1])), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_py_redoes_a_comparison_from_eval_json_without_torch(tmp_path):
    for run, saes in two_arms([0, 1], calibrated=True).items():
        for name, r in saes.items():
            os.makedirs(tmp_path / run / name)
            (tmp_path / run / name / "eval.json").write_text(json.dumps(r).replace("NaN", "null"))
    code = ("import sys, compare; compare.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'compare.py imported torch'; print('no torch')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out/p0.0_s0"), str(tmp_path / "out/p0.3_s0"),
                          str(tmp_path / "out/p0.0_s1"), str(tmp_path / "out/p0.3_s1"),
                          f"--comparison_file={tmp_path}/c.md"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no torch" in out.stdout and "## Verdicts" in (tmp_path / "c.md").read_text()
    missing = subprocess.run([sys.executable, "compare.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "no eval.json in it or in its subfolders" in missing.stderr


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


def test_nulls_of_one_width_share_their_directions_and_pool_together():
    """A metric makes its nulls through one `shared` dict: the directions and the sorted
    pre-activations are made once per width, and each null is the one null_sae makes alone.
    mean_pool of a list of them computes each chunk's pre-activations once, with the same result
    as pooling each null alone; an SAE that differs in more than its threshold is refused."""
    x = torch.randn(3000, 32) + 1.0
    trained = sae_lib.SAE(32, 128, arch="batchtopk", k=10)
    shared = {}
    nulls = [ev.null_sae(trained, x, target, 1, shared) for target in (5.0, 10.0, 20.0)]
    assert len(shared) == 1
    for null, target in zip(nulls, (5.0, 10.0, 20.0)):
        alone = ev.null_sae(trained, x, target, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), null.state_dict().values()))
        assert alone.cfg == null.cfg and null.cfg["k"] == round(target)
        theta = sae_lib.calibrate_threshold(null, x, target)[0]  # the null's own pre-activations, sorted and searched
        assert float(null.threshold) == torch.tensor(theta, dtype=torch.float32).item()
    assert len({float(n.threshold) for n in nulls}) == 3
    counts = torch.tensor([1000, 0, 1500, 500])
    together = ev.mean_pool(x, counts, nulls, batch_tokens=700)  # chunks cross the texts' bounds
    for null, pooled in zip(nulls, together):
        assert torch.equal(pooled, ev.mean_pool(x, counts, null, batch_tokens=700))
    assert torch.equal(together[1][0], ev.encode(nulls[1], x[:1000]).double().mean(0).float())
    with pytest.raises(ValueError, match="threshold alone"):
        ev.mean_pool(x, counts, [nulls[0], trained])


def test_one_arm_at_several_budgets_is_the_validity_gate_curve_not_a_comparison(tmp_path):
    sample = np.random.default_rng(1).normal(0, 0.02, B)
    runs = {}
    for tokens, absorption, testable in ((262_144, 0.70, False), (1_048_576, 0.30, True)):
        r = fake_eval(0.0, 0, 20, 20.0, 0.6, absorption=absorption, sample=sample, testable=testable)
        r["sae_cfg"]["training_tokens"] = tokens
        r["absorption"]["null_uncertainty"] = dict(mean_full_absorption_score=dict(replicates=(0.45 + sample).tolist()))
        r["absorption"]["diagnostics"] = dict(main_latents_f1=0.2 if tokens < 10**6 else 0.6)
        runs[f"out/gate_{tokens}"] = {"k20": r}
    arms = compare.group_arms(runs)
    by_tokens = compare.budget_arms(arms)
    assert list(by_tokens) == [262_144, 1_048_576]
    md = compare.budget_report(by_tokens, arms)
    # score − null pairs the replicates, so the shared sample cancels: exactly +0.25 and −0.15
    assert "| 262,144 | k20 | 1 | 20.0000 | 0.6000 |" in md
    assert "+0.2500 [+0.2500, +0.2500] | 0.2000 | 15 | untestable: score not clearly below its null |" in md
    assert "-0.1500 [-0.1500, -0.1500] | 0.6000 | 15 | testable |" in md
    assert "Verdicts" not in md
    assert compare.budget_arms(compare.group_arms(two_arms([0]))) is None  # baseline vs masked: a comparison
    compare.report(runs, str(tmp_path / "gate.md"))
    assert (tmp_path / "gate.md").read_text() == md and (tmp_path / "gate.png").stat().st_size > 0
