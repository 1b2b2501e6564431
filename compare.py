"""
Compare the arms of an experiment (baseline vs masked, and any ablation) from the eval.json files
evaluate.py wrote: per-run tables, each arm's value and each paired Δ with an interval that holds
both the seeds' spread and the evaluation sample's, the verdict on the primary endpoints fixed
below, comparison.md and one PNG. It reads eval.json only (no torch, no model), so a comparison is
redone in seconds; `python evaluate.py RUN...` ends by calling it.

Run (from the repository root):
  python compare.py out/gemma3_p0 out/gemma3                  # the runs' eval.json -> comparison.md
  python compare.py out/mini_p0.0_s* out/mini_p0.3_s* --comparison_file=out/mini_comparison.md

Runs are grouped into arms by their SAE cfgs (mask_prob, and any other setting they differ in
besides seed, k, data_seed and the like) and paired by (seed, SAE); the first run's arm is the
baseline. Primary endpoints, fixed before any run (the README says the same): Mean full absorption
and the OOD gap to the oracle (k=128), each at L0 20 and 80, Δ = other arm − baseline, Holm's
correction over the four. Everything else is secondary; SCR and TPP are shown as unreliable and
never enter a verdict. Runs of one arm that differ in training tokens alone (the validity gate of
configs/experiment.py) get the budget curve instead: each score beside its null, no verdict.
"""
import functools
import io
import json
import math
import os
import re

import numpy as np

import configurator

# -----------------------------------------------------------------------------
comparison_file = "out/comparison.md"   # the Markdown report; the PNG goes beside it (.png)
matched_points = 3                      # matched-L0 rows: L0 values per metric, where L0 differs

_HEADLINE = [  # (label, metric, key, ↑ better / ↓)
    ("L0", "core", "l0", ""),
    ("EV (global)", "core", "explained_variance", "↑"),
    ("EV (SAEBench legacy)", "core", "explained_variance_legacy", "↑"),
    ("CE loss recovered", "core", "ce_loss_score", "↑"),
    ("ΔLM loss", "core", "delta_lm_loss", "↓"),
    ("Mean full absorption", "absorption", "mean_full_absorption_score", "↓"),
    ("Absorption fraction", "absorption", "mean_absorption_fraction_score", "↓"),
    ("Sparse probing top-1", "sparse_probing", "sae_top_1_test_accuracy", "↑"),
    ("Sparse probing top-5", "sparse_probing", "sae_top_5_test_accuracy", "↑"),
    ("SCR (N={n}{how})", "scr", "scr_metric", "↑"),
    ("TPP (N={n}{how})", "tpp", "tpp_metric", "↑"),
    ("OOD SAE AUC (k=128)", "ood", "sae_auc_k128", "↑"),
    ("OOD gap to oracle (k=128)", "ood", "gap_k128", "↓"),
]
_ABLATION_LABELS = {"valid": "ablated at valid positions only (definition)",
                    "saebench": "SAEBench's figure: zeroed BOS/pad rows encoded and ablated too"}
# (metric, key, target k, the paper's Δ range): arXiv 2604.06495 reports absorption 2.35-3.75 points
# lower and the OOD gap narrowed by up to 2.4 points; Δ = masked − baseline on the raw score
PRIMARY = [("absorption", "mean_full_absorption_score", 20, (-0.0375, -0.0235)),
           ("absorption", "mean_full_absorption_score", 80, (-0.0375, -0.0235)),
           ("ood", "gap_k128", 20, (-0.024, 0.0)),
           ("ood", "gap_k128", 80, (-0.024, 0.0))]
_UNRELIABLE_WHY = ("An audit of SAE benchmarks (arXiv 2605.18229, 2026) finds TPP worsens the longer an SAE "
                   "trains and SCR anti-correlates with ground truth, so neither enters a verdict")
_PAIR_KEYS = {"seed", "k", "l1_coefficient", "scale", "data_seed", "threshold_used", "calibration_l0",
              "threshold_ema", "threshold_calibrated", "calibration_tokens", "calibration_l0_ema"}  # vary inside one arm
_METHOD = (  # the README says the same
    "Intervals hold both levels of noise. Each SAE's eval.json stores bootstrap replicates of every "
    "metric over its evaluation sample (words, texts), replicate b being the same resample for every SAE "
    "of one model and layer. An arm's value is its mean over training seeds; its variance is the seeds' "
    "part s²/n (Student t over seeds) plus the evaluation sample's part, the variance over b of the "
    "seeds' mean of replicate b (the sample is shared by every seed, so it does not average out). A Δ "
    "(other arm − baseline) is the same on the differences of SAEs paired by seed and k, replicate b "
    "against replicate b. The interval is mean ± t·SE with Welch-Satterthwaite degrees of freedom, and "
    "p is its two-sided t test. With one seed the interval is the evaluation sample's alone; where "
    "eval.json has no replicates it is the seeds' alone. Rows at calibrated L0 (the inference threshold "
    "set so that L0 on clean text equals k) compare at equal sparsity with no interpolation; rows at "
    "nominal k with the EMA threshold are the paper's framing; matched-L0 rows interpolate linearly in "
    "log(L0), replicate by replicate, only where L0 still differs, inside the L0 range every arm covers "
    "in every seed.")


def _write_atomic(path, data):
    """Write to a temporary file, fsync, rename: a crash never leaves half a file. The temporary
    name carries the pid because evaluate.py processes share cache_dir and may write one entry."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file, and free what the partial one took
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(f"could not write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- reading eval.json

def headline_entries(result):
    """(label, metric, key, value) of the headline metrics an eval.json holds; value None where the
    metric could not be computed (null in eval.json, its reason under "null_reasons"). SCR/TPP
    labels carry their N, and say so when the ablation reproduced SAEBench's figure."""
    rows = []
    for label, metric, key, arrow in _HEADLINE:
        r = result.get(metric)
        if not isinstance(r, dict) or key not in r:
            continue
        n = r.get("headline_n", result.get("settings", {}).get("headline_n"))
        how = ", SAEBench ablation" if r.get("ablation_positions") == _ABLATION_LABELS["saebench"] else ""
        rows.append((f"{label.format(n=n, how=how)} {arrow}".strip(), metric, key, r[key]))
    return rows


def headline(result):
    """(label, value) of the headline metrics an eval.json holds (headline_entries)."""
    return [(label, value) for label, _, _, value in headline_entries(result)]


def headline_labels(results):
    """The headline labels present in any of these eval.json dicts, in _HEADLINE order."""
    return list(dict.fromkeys(label for r in results for label, _ in headline(r)))


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measurement(result, label):
    """(value, replicates or None, null value or None) of one headline label in one eval.json;
    replicates: the metric's stored bootstrap over its evaluation sample (NaN where one was not
    finite). (None, None, None) when the SAE or the metric is missing."""
    for name, metric, key, value in headline_entries(result or {}):
        if name == label:
            r = result[metric]
            reps = ((r.get("uncertainty") or {}).get(key) or {}).get("replicates")
            reps = None if not reps else np.array([np.nan if v is None else v for v in reps], dtype=np.float64)
            null = (r.get("null") or {}).get(key)
            return (value if _finite(value) else None), reps, (null if _finite(null) else None)
    return None, None, None


def label_of(metric, key):
    return next(label for label, m, k, _ in _HEADLINE if (m, k) == (metric, key))


def _full_label(metric, key):
    arrow = next(a for _, m, k, a in _HEADLINE if (m, k) == (metric, key))
    return f"{label_of(metric, key)} {arrow}".strip()


def run_table(run, results):
    """A Markdown table: one row per SAE, the headline metrics as columns."""
    labels = headline_labels(results.values())
    lines = [f"| SAE | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
    for name, r in results.items():
        values = dict(headline(r))
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(label)) for label in labels) + " |")
    return f"### {run}\n\n" + "\n".join(lines)


def _fmt(value):
    return "—" if not _finite(value) else f"{value:.4f}"


def read_runs(runs):
    """{run folder: {SAE name: eval.json}}: a run is a folder of SAE folders or one SAE's folder;
    SAE names as evaluate.py gives them, ordered by the SAE's k."""
    out = {}
    for run in runs:
        if not os.path.isdir(run):
            raise FileNotFoundError(f"{run}: no such run folder")
        if os.path.isfile(os.path.join(run, "eval.json")):
            folders = {os.path.basename(os.path.normpath(run)): run}
        else:
            folders = {d: os.path.join(run, d) for d in sorted(os.listdir(run))
                       if os.path.isfile(os.path.join(run, d, "eval.json"))}
            missing = [d for d in sorted(os.listdir(run)) if d not in folders
                       and os.path.isfile(os.path.join(run, d, "sae.safetensors"))]
            if missing:
                raise FileNotFoundError(f"{run}/{missing[0]} has no eval.json: run `python evaluate.py {run}` first")
        if not folders:
            raise FileNotFoundError(f"{run}: no eval.json in it or in its subfolders (run evaluate.py first)")
        saes = {}
        for name, folder in folders.items():
            path = os.path.join(folder, "eval.json")
            try:
                with open(path) as f:
                    saes[name] = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e}); rerun evaluate.py on it") from None
            if not isinstance(saes[name], dict):
                raise ValueError(f"{path}: expected a JSON object; rerun evaluate.py on it")
        out[run] = dict(sorted(saes.items(), key=lambda kv: (kv[1].get("sae_cfg", {}).get("k") or 0, kv[0])))
    return out


# ----------------------------------------------------------------------------- statistics

def _t_central(t, df):
    """P(|T| ≤ t) for Student t with integer df ≥ 1: Abramowitz & Stegun 26.7.3-4 in closed form
    (numpy has no t distribution)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    term, total = 1.0, 1.0
    if df % 2:  # odd: (2/π)(θ + sin θ cos θ (1 + 2/3 cos²θ + (2·4)/(3·5) cos⁴θ + ...))
        for j in range(1, (df - 1) // 2):
            term *= (2 * j) / (2 * j + 1) * c * c
            total += term
        return 2 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    for j in range(1, df // 2):  # even: sin θ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ...)
        term *= (2 * j - 1) / (2 * j) * c * c
        total += term
    return s * total


_MAX_DF = 2000  # beyond this t is the normal to 4 decimals


def _df(df):
    return _MAX_DF if not math.isfinite(df) else max(1, min(_MAX_DF, int(df)))  # floor: conservative


@functools.lru_cache
def t_quantile(df, level=0.95):
    """The two-sided Student-t quantile: P(|T| ≤ q) = level for integer df ≥ 1, by bisection."""
    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def two_level(values, replicates, level=0.95):
    """Mean over seeds with an interval holding both levels of noise. values: {seed: value};
    replicates: {seed: array of the stored bootstrap replicates or None}, replicate b being one
    resample of the evaluation sample shared by every seed. SE² = s²/n (seeds) + Var_b(mean over
    seeds of replicate b) (evaluation sample); mean ± t·SE, Welch-Satterthwaite df (the sample
    part counted with unbounded df); p: the two-sided t test of mean = 0. Returns dict(mean, lo,
    hi, se, p, n, how)."""
    seeds = [s for s, v in values.items() if _finite(v)]
    n = len(seeds)
    out = dict(mean=float("nan"), lo=None, hi=None, se=None, p=None, n=n, how="no data")
    if n == 0:
        return out
    x = np.array([values[s] for s in seeds], dtype=np.float64)
    out["mean"] = float(x.mean())
    seed_part = float(x.var(ddof=1)) / n if n >= 2 else None
    reps = [replicates.get(s) for s in seeds]
    sample_part = None
    if all(r is not None for r in reps) and len({len(r) for r in reps}) == 1:
        R = np.stack(reps)
        R = R[:, np.isfinite(R).all(0)]
        if R.shape[1] >= 2:
            sample_part = float(R.mean(0).var(ddof=1))
    if seed_part is None and sample_part is None:
        out["how"] = "n=1; no interval"
        return out
    var = (seed_part or 0.0) + (sample_part or 0.0)
    df = math.inf if not seed_part else var ** 2 / (seed_part ** 2 / (n - 1))
    q, se = t_quantile(_df(df), level), math.sqrt(var)
    out.update(lo=out["mean"] - q * se, hi=out["mean"] + q * se, se=se,
               how=("seeds + evaluation sample" if seed_part is not None and sample_part is not None else
                    "evaluation sample only (1 seed)" if seed_part is None else
                    "seeds only (eval.json holds no bootstrap replicates)"))
    out["p"] = (1.0 if out["mean"] == 0 else 0.0) if se == 0 else 1 - _t_central(abs(out["mean"]) / se, _df(df))
    return out


def summary(per_seed, level=0.95):
    """two_level of {seed: (value, replicates or None)}."""
    return two_level({s: v for s, (v, _) in per_seed.items()}, {s: r for s, (_, r) in per_seed.items()}, level)


def paired(base, other, level=0.95):
    """base, other: {seed: (value, replicates or None)}. Each arm's two_level and, over the seeds
    both have, the Δ other − base of the pairs, replicate b against replicate b."""
    seeds = [s for s in base if s in other and _finite(base[s][0]) and _finite(other[s][0])]
    diff = {}
    for s in seeds:
        (a, ra), (b, rb) = base[s], other[s]
        diff[s] = (b - a, rb - ra if ra is not None and rb is not None and len(ra) == len(rb) else None)
    return dict(base=summary(base, level), other=summary(other, level), delta=summary(diff, level))


def holm(p_values):
    """Holm's step-down adjusted p-values (same order as given; None stays None)."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted, running = [None] * len(p_values), 0.0
    for j, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - j) * p))
        adjusted[i] = running
    return adjusted


def verdict(lo, hi, paper, resolved, untestable=()):
    """One of the four verdicts for an endpoint's Δ interval [lo, hi] against the paper's Δ range:
    untestable here (reasons given), excludes the paper's effect (the interval lies entirely
    outside the range), consistent with the paper's effect (a difference resolved in the paper's
    direction, overlapping its range), no difference resolved."""
    if untestable or lo is None or hi is None:
        return "untestable here"
    if hi < paper[0] or lo > paper[1]:
        return "excludes the paper's effect"
    if resolved and (lo + hi) / 2 < 0:
        return "consistent with the paper's effect"
    return "no difference resolved"


def interpolate_log_l0(l0, values, targets):
    """One run's metric at the target L0s, linear in log(L0) between its SAEs; NaN outside the
    L0 range its SAEs span (no extrapolation). SAEs with the same L0 are averaged."""
    points = {}
    for x, v in zip(l0, values):
        if _finite(x) and _finite(v) and x > 0:
            points.setdefault(float(x), []).append(v)
    out = np.full(len(targets), np.nan)
    if not points:
        return out
    xs = np.array(sorted(points))
    ys = np.array([np.mean(points[x]) for x in xs])
    t = np.asarray(targets, dtype=np.float64)
    inside = (t >= xs[0] * (1 - 1e-9)) & (t <= xs[-1] * (1 + 1e-9))
    out[inside] = np.interp(np.log(t[inside]), np.log(xs), ys)
    return out


# ----------------------------------------------------------------------------- arms

def group_arms(runs):
    """{arm: {seed: {SAE name: eval.json}}} from {run folder: {SAE name: eval.json}}, arms in the
    order of the runs. An arm is mask_prob plus every other SAE cfg key the runs differ in besides
    seed, k and the calibration's own records (so an ablation such as train_on_masked=False is an
    arm of its own). Its name is mask_prob plus the keys where it differs from the first run: as
    unique as listing every differing key, and far shorter."""
    cfgs = {(run, name): r.get("sae_cfg", {}) for run, saes in runs.items() for name, r in saes.items()}
    keys = sorted({k for c in cfgs.values() for k in c} - _PAIR_KEYS - {"mask_prob"})
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in cfgs.values()}) > 1]
    first, arms = next(iter(cfgs.values()), {}), {}
    for (run, name), c in cfgs.items():
        arm = ", ".join([f"p={c.get('mask_prob')}"] +
                        [f"{k}={c.get(k)}" for k in differing if json.dumps(c.get(k)) != json.dumps(first.get(k))])
        by_name = arms.setdefault(arm, {}).setdefault(c.get("seed"), {})
        if name in by_name:
            raise ValueError(f"{run}/{name} and {by_name[name]['sae']} are both arm {arm}, seed "
                             f"{c.get('seed')}, SAE {name}: train each seed of an arm once (--seed=...)")
        by_name[name] = runs[run][name]
    return arms


def _arm_results(arms):
    return [r for arm in arms.values() for saes in arm.values() for r in saes.values()]


def _labels_with_data(arms):
    results = _arm_results(arms)
    return [label for label in headline_labels(results)
            if any(measurement(r, label)[0] is not None for r in results)]


def _calibrated(result):
    return (result or {}).get("sae_cfg", {}).get("threshold_used") == "calibrated"


def _at_k(saes, k):
    """The SAE of one seed whose cfg k is k (None if none)."""
    return next((r for r in saes.values() if r.get("sae_cfg", {}).get("k") == k), None)


def _per_seed(arm, pick, label):
    """{seed: (value, replicates)} of one arm, pick(saes) choosing the SAE of each seed."""
    return {seed: measurement(pick(saes), label)[:2] for seed, saes in arm.items()}


def _per_seed_mean_over(arm, names, label):
    """Each seed's mean over the given SAEs, replicate by replicate (None if one lacks the metric)."""
    out = {}
    for seed, saes in arm.items():
        got = [measurement(saes.get(n), label)[:2] for n in names]
        if not all(v is not None for v, _ in got):
            out[seed] = (None, None)
            continue
        reps = [r for _, r in got]
        same = all(r is not None for r in reps) and len({len(r) for r in reps}) == 1
        out[seed] = (float(np.mean([v for v, _ in got])), np.mean(reps, axis=0) if same else None)
    return out


def _mean_null(arm, pick, label):
    nulls = [measurement(pick(saes), label)[2] for saes in arm.values()]
    nulls = [v for v in nulls if v is not None]
    return float(np.mean(nulls)) if nulls else None


def _mean_l0(arm, pick):
    l0 = [measurement(pick(saes), "L0")[0] for saes in arm.values()]
    l0 = [v for v in l0 if v is not None]
    return float(np.mean(l0)) if l0 else None


def matched_l0_grid(arms, points=3, names=None):
    """`points` L0 values, evenly spaced in log, over the L0 range that every arm's SAEs (those
    named, default all) cover in every seed the arms share; [] when there is none."""
    seeds = set.intersection(*(set(a) for a in arms.values()))
    ranges = []
    for seed in seeds:
        for arm in arms.values():
            l0 = [measurement(r, "L0")[0] for n, r in arm[seed].items() if names is None or n in names]
            l0 = [v for v in l0 if v is not None and v > 0]
            if not l0:
                return []
            ranges.append((min(l0), max(l0)))
    if not ranges:
        return []
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if lo > hi:
        return []
    return [lo] if math.isclose(lo, hi) else [float(v) for v in np.exp(np.linspace(math.log(lo), math.log(hi), points))]


def _matched(arm, label, grid, names=None):
    """{seed: [(value, replicates) at each grid L0]} of one arm, each replicate interpolated too.
    interpolate_log_l0 is linear in the values, so its weights (the interpolation of unit vectors)
    apply to the point values and to every replicate at once."""
    out = {}
    for seed, saes in arm.items():
        got = [(measurement(r, "L0")[0], *measurement(r, label)[:2]) for n, r in saes.items()
               if names is None or n in names]
        used = [j for j, (x, v, _) in enumerate(got) if v is not None]
        W = np.zeros((len(grid), len(got)))
        for j in used:
            W[:, j] = interpolate_log_l0([got[i][0] for i in used], [float(i == j) for i in used], grid)
        values = W @ np.array([0.0 if v is None else v for _, v, _ in got])
        reps = [r for _, _, r in got]
        R = None
        if all(reps[j] is not None for j in used) and len({len(reps[j]) for j in used}) == 1 and used:
            R = W @ np.stack([reps[j] if j in used else np.zeros(len(reps[used[0]])) for j in range(len(got))])
        out[seed] = [(float(values[i]), None if R is None else R[i]) for i in range(len(grid))]
    return out


# ----------------------------------------------------------------------------- the report

def _cell(s):
    if s["n"] == 0:
        return "no data"
    return f"{s['mean']:.4f}" + ("" if s["lo"] is None else f" [{s['lo']:.4f}, {s['hi']:.4f}]")


def _delta_cell(s):
    if s["n"] == 0:
        return "no data"
    return f"{s['mean']:+.4f}" + ("" if s["lo"] is None else f" [{s['lo']:+.4f}, {s['hi']:+.4f}]")


def _table(arms, rows, where="SAE"):
    """rows: [(metric, where, [paired() per other arm])]: Markdown, the first arm as baseline."""
    names = list(arms)
    header = (f"| metric | {where} | " + " | ".join(f"`{a}`" for a in names) + " | "
              + " | ".join(f"Δ `{a}` − `{names[0]}` [95% CI] | p" for a in names[1:]) + " | n |")
    lines = [header, "|---" * (3 + len(names) + 2 * (len(names) - 1)) + "|"]
    for label, at, comparisons in rows:
        cells = [_cell(comparisons[0]["base"])] + [_cell(c["other"]) for c in comparisons]
        for c in comparisons:
            cells += [_delta_cell(c["delta"]), "—" if c["delta"]["p"] is None else f"{c['delta']['p']:.3g}"]
        n = sorted({c["delta"]["n"] for c in comparisons})
        lines.append(f"| {label} | {at} | " + " | ".join(cells) + f" | {', '.join(map(str, n))} |")
    return "\n".join(lines)


def _framing(arms, name):
    """How the SAEs named `name` are compared: at calibrated L0 when every one of them is."""
    results = [saes.get(name) for arm in arms.values() for saes in arm.values() if name in saes]
    return "calibrated L0" if results and all(_calibrated(r) for r in results) else "nominal k, EMA threshold"


def comparison_rows(arms, labels):
    """By SAE name (equal k): a row per (metric, SAE) and per metric an 'all k' row over the SAE
    names every arm has in every seed."""
    base, others = arms[next(iter(arms))], list(arms.values())[1:]
    names = list(dict.fromkeys(n for arm in arms.values() for saes in arm.values() for n in saes))
    common = [n for n in names if all(n in saes for arm in arms.values() for saes in arm.values())]
    rows = []
    for label in labels:
        for name in names:
            pick = lambda saes, name=name: saes.get(name)
            comparisons = [paired(_per_seed(base, pick, label), _per_seed(o, pick, label)) for o in others]
            if comparisons[0]["base"]["n"] + sum(c["other"]["n"] for c in comparisons):
                rows.append((label, f"{name} ({_framing(arms, name)})", comparisons))
        if len(common) > 1 and label != "L0":
            rows.append((label, f"all k ({len(common)} SAEs)", [
                paired(_per_seed_mean_over(base, common, label), _per_seed_mean_over(o, common, label))
                for o in others]))
    return rows


def _endpoint(arms, other, metric, key, k, level):
    """One primary endpoint, baseline vs `other`: the paired comparison at target k (calibrated SAEs
    when every one is), each arm's L0 and null, the framing and what makes it untestable."""
    base = arms[next(iter(arms))]
    label = _full_label(metric, key)
    pick = lambda saes: _at_k(saes, k)
    chosen = [pick(saes) for arm in (base, arms[other]) for saes in arm.values()]
    reasons, by_kind, found = [], {}, [r for r in chosen if r is not None]
    if len(found) < len(chosen):
        reasons.append(f"no SAE with k={k} in every seed of both arms")
    for r in found:
        validity = (r.get(metric) or {}).get("validity") or {}
        if validity.get("testable") is False:
            for why in validity.get("reasons") or ["flagged untestable (no reason recorded)"]:
                # one entry per kind of reason, not per SAE: its figures differ from SAE to SAE
                by_kind.setdefault(re.sub(r"[-+]?\d[\d.]*", "#", why.split(" (")[0]), []).append(why)
    reasons += [f"{whys[0]} ({len(whys)} of {len(found)} SAEs{'' if len(set(whys)) == 1 else '; the first shown'})"
                for whys in by_kind.values()]
    framing = ("calibrated L0" if chosen and all(_calibrated(r) for r in chosen) else
               "nominal k, EMA threshold (the paper's framing)")
    comparison = paired(_per_seed(base, pick, label), _per_seed(arms[other], pick, label), level)
    if not reasons and comparison["delta"]["n"] == 0:
        reasons.append(f"no value of {label_of(metric, key)} in the SAEs' eval.json (evaluate it)")
    elif not reasons and comparison["delta"]["lo"] is None:
        reasons.append("no interval: 1 seed and no bootstrap replicates in eval.json")
    return dict(label=label, k=k, framing=framing, reasons=reasons, comparison=comparison,
                l0=(_mean_l0(base, pick), _mean_l0(arms[other], pick)),
                null=(_mean_null(base, pick, label), _mean_null(arms[other], pick, label)))


def verdicts(arms):
    """{other arm: [endpoint dicts with their verdict]}: the four primary endpoints, Δ intervals at
    the simultaneous level 1 − 0.05/4 and Holm-adjusted p-values."""
    level = 1 - 0.05 / len(PRIMARY)
    out = {}
    for other in list(arms)[1:]:
        endpoints = [_endpoint(arms, other, metric, key, k, level) for metric, key, k, _ in PRIMARY]
        adjusted = holm([None if e["reasons"] else e["comparison"]["delta"]["p"] for e in endpoints])
        for e, p_holm, (_, _, _, paper) in zip(endpoints, adjusted, PRIMARY):
            d = e["comparison"]["delta"]
            e.update(p_holm=p_holm, paper=paper,
                     verdict=verdict(d["lo"], d["hi"], paper, p_holm is not None and p_holm < 0.05, e["reasons"]))
        out[other] = endpoints
    return out


def _verdict_line(e, base_name, other):
    d = e["comparison"]["delta"]
    l0 = " / ".join("—" if v is None else f"{v:.1f}" for v in e["l0"])
    head = f"- **{e['label']} at L0 {e['k']}**, `{other}` − `{base_name}` ({e['framing']}; L0 on clean text {l0}): "
    if e["verdict"] == "untestable here":
        return head + f"*untestable here*: {'; '.join(e['reasons']) or 'no interval'}."
    width, effect = d["hi"] - d["lo"], max(abs(v) for v in e["paper"])
    line = (head + f"*{e['verdict']}*: Δ {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] "
            f"({100 * (1 - 0.05 / len(PRIMARY)):.2f}% interval, {d['how']}, n={d['n']}; Holm p {e['p_holm']:.3g}); "
            f"the paper's Δ is {e['paper'][0]:+.4f} to {e['paper'][1]:+.4f}")
    if e["verdict"] == "no difference resolved":
        line += f"; the interval is {width:.4f} wide, {width / effect:.1f}× the paper's largest effect"
    return line + "."


def headline_table(arms, found):
    """The compact table: each primary endpoint and EV at each target k, value [95% CI] per arm with
    its null beside it, Δ [95% CI] and n."""
    names = list(arms)
    header = ("| metric | at | " + " | ".join(f"`{a}` | null" for a in names) + " | "
              + " | ".join(f"Δ `{a}` − `{names[0]}` [95% CI]" for a in names[1:]) + " | n |")
    lines = [header, "|---" * (3 + 2 * len(names) + len(names) - 1) + "|"]
    rows = [(metric, key, k) for metric, key, k, _ in PRIMARY]
    rows += [("core", "explained_variance", k) for k in sorted({k for _, _, k, _ in PRIMARY})]
    base = arms[names[0]]
    for metric, key, k in rows:
        label = _full_label(metric, key)
        pick = lambda saes: _at_k(saes, k)
        comparisons = [paired(_per_seed(base, pick, label), _per_seed(arms[o], pick, label)) for o in names[1:]]
        nulls = [_mean_null(arms[a], pick, label) for a in names]
        if not comparisons[0]["base"]["n"]:
            continue
        found.update(c["delta"]["how"] for c in comparisons)
        cells = []
        for s, null in zip([comparisons[0]["base"]] + [c["other"] for c in comparisons], nulls):
            cells += [_cell(s), _fmt(null)]
        cells += [_delta_cell(c["delta"]) for c in comparisons]
        framing = "calibrated" if all(_calibrated(pick(saes)) for a in names for saes in arms[a].values()) else "nominal k"
        lines.append(f"| {label} | k{k} ({framing}) | " + " | ".join(cells)
                     + f" | {', '.join(str(c['delta']['n']) for c in comparisons)} |")
    return "\n".join(lines) if len(lines) > 2 else "no SAE at the primary endpoints' k (20, 80) in every arm."


def caveats(arms):
    """What the comparison rests on, as Markdown bullets, read from the SAE cfgs and eval.json."""
    results = _arm_results(arms)
    cfgs = [r.get("sae_cfg", {}) for r in results]
    lines = []
    if any((c.get("d_in") or 1e9) <= 256 for c in cfgs):  # evaluate.load_llm's tiny-model rule
        lines.append("- **RANDOM MODEL.** These SAEs sit on a tiny model (d_model ≤ 256; the offline default "
                     "has random weights): the numbers say nothing about the paper, they only show that "
                     "every stage runs.")
    models = sorted({f"`{c.get('model')}` layer {c.get('layer')} (d {c.get('d_in')})" for c in cfgs})
    lines.append(f"- Model: {', '.join(models)}.")
    for arm, by_seed in arms.items():
        saes = [r for s in by_seed.values() for r in s.values()]
        tokens = sorted({r.get("sae_cfg", {}).get("training_tokens") for r in saes}, key=str)
        thresholds = sorted({r.get("sae_cfg", {}).get("threshold_used") or "ema (not recorded)" for r in saes})
        folders = sorted({os.path.dirname(r.get("sae", "")) or r.get("sae", "?") for r in saes})
        lines.append(f"- Arm `{arm}` (mask_prob {saes[0].get('sae_cfg', {}).get('mask_prob')}): "
                     f"{len(by_seed)} seed(s) {sorted(by_seed, key=str)}, {len(saes)} SAEs, "
                     f"training tokens seen per SAE {', '.join(f'{t:,}' if t else 'not recorded' for t in tokens)}, "
                     f"inference threshold {', '.join(thresholds)}; runs {', '.join(f'`{f}`' for f in folders)}.")
    absorption = [r["absorption"] for r in results if isinstance(r.get("absorption"), dict)]
    if absorption:
        kept = sorted({a.get("n_letters_kept", 0) for a in absorption})
        evaluated = {26 - len(a.get("letters_skipped_too_few_tokens", [])) for a in absorption}
        gate = {r.get("settings", {}).get("absorption_probe_f1_gate") for r in results if "absorption" in r}
        passing = f"{kept[0]}" if len(kept) == 1 else f"{kept[0]} to {kept[-1]} (by SAE)"
        lines.append(f"- Absorption: {passing} letters pass the probe gate (F1 > {', '.join(map(str, gate))}) "
                     f"out of {', '.join(map(str, sorted(evaluated)))} evaluated; SAEBench wants ≥ 20.")
    for metric, key, what in (("scr", "test_texts_per_cell", "test texts per class × attribute cell"),
                              ("tpp", "test_texts_per_class", "test texts per class")):
        found = [r[metric] for r in results if isinstance(r.get(metric), dict)]
        counts = sorted({json.dumps(f[key]) for f in found if key in f})
        if found:
            lines.append(f"- {metric.upper()}: {what}: {', '.join(counts) or 'not recorded (rerun it)'}.")
    absent = [label.replace(" (N={n}{how})", "") for label, metric, key, _ in _HEADLINE
              if not any(key in (r.get(metric) or {}) for r in results)]
    undefined = [label for label in headline_labels(results) if label not in _labels_with_data(arms)]
    if undefined:
        lines.append(f"- **No data** (NaN in every SAE, so no row and an empty panel): {', '.join(undefined)}.")
    if absent:
        lines.append(f"- Not evaluated (no row, no panel): {', '.join(absent)}.")
    seeds = [set(a) for a in arms.values()]
    if len(set.intersection(*seeds)) < 2:
        lines.append("- Fewer than 2 seeds shared by the arms: the seeds' spread is unknown, so an interval, where "
                     "there is one, is the evaluation sample's alone. Train more seeds (`--seed=1`, `--seed=2`, ...).")
    return "\n".join(lines)


def comparison_report(arms, matched_points=3):
    """comparison.md's text for group_arms's {arm: {seed: {SAE name: eval.json}}}."""
    base_name = next(iter(arms))
    lines = [f"- {_verdict_line(e, base_name, other)[2:]}" for other, endpoints in verdicts(arms).items()
             for e in endpoints]
    found = set()
    compact = headline_table(arms, found)
    notes = {"n=1; no interval": "Rows without an interval are metrics with one seed and no bootstrap "
                                  "replicates in eval.json (core's L0, EV and CE loss have none).",
             "evaluation sample only (1 seed)": "n=1 seed: every interval is the evaluation sample's alone "
                                                "(the seeds' spread is unknown).",
             "seeds only (eval.json holds no bootstrap replicates)": "Some eval.json hold no bootstrap "
                                                "replicates: those intervals are the seeds' spread alone."}
    said = [notes[h] for h in notes if h in found]
    labels = _labels_with_data(arms)
    rows = comparison_rows(arms, [lab for lab in labels if not lab.startswith(("SCR", "TPP"))])
    unreliable = comparison_rows(arms, [lab for lab in labels if lab.startswith(("SCR", "TPP"))])
    names = list(dict.fromkeys(n for arm in arms.values() for saes in arm.values() for n in saes))
    differing = [n for n in names if _framing(arms, n) != "calibrated L0"]
    if not differing:
        matched = "not needed: every SAE is at calibrated L0, so equal k is equal sparsity on clean text."
    else:
        grid, matched_rows = matched_l0_grid(arms, matched_points, differing), []
        for label in labels[1:] if grid else []:
            at = [_matched(arm, label, grid, differing) for arm in arms.values()]
            matched_rows += [(label, f"L0 = {l0:.1f}", [paired({s: v[i] for s, v in at[0].items()},
                                                               {s: v[i] for s, v in other.items()}) for other in at[1:]])
                             for i, l0 in enumerate(grid)]
        matched = (_table(arms, matched_rows, where="at") if grid else
                   "no data: no L0 range is covered by every arm's SAEs in every shared seed.")
    return (f"# Baseline vs masked\n\n## Verdicts on the primary endpoints\n\nFixed in advance: Mean full "
            "absorption and the OOD gap to oracle (k=128), each at L0 20 and 80, Holm's correction over the four; "
            "every other number is secondary.\n\n" + "\n".join(lines) + "\n\n"
            + (" ".join(said) + "\n\n" if said else "")
            + f"{compact}\n\n## What these numbers rest on\n\n{caveats(arms)}\n\n## Method\n\n{_METHOD}\n\n"
            f"## Every metric, by k\n\n{_table(arms, rows)}\n\n"
            f"## SCR and TPP: unreliable, secondary, never in a verdict\n\n{_UNRELIABLE_WHY}.\n\n"
            + (_table(arms, unreliable) if unreliable else "not evaluated.")
            + f"\n\n## At matched L0 (where L0 still differs)\n\n{matched}\n")


# ----------------------------------------------------------------------------- the validity gate

def budget_arms(arms):
    """{training tokens: arm} when the arms differ in training_tokens alone (one arm's SAEs
    exported at several budgets: the validity gate), else None."""
    by_tokens, p_first = {}, next(iter(arms)).split(", ")[0]
    for name, arm in arms.items():
        p, *rest = name.split(", ")
        tokens = _arm_results({name: arm})[0].get("sae_cfg", {}).get("training_tokens")
        if p != p_first or tokens is None or any(not r.startswith("training_tokens=") for r in rest):
            return None
        by_tokens[int(tokens)] = arm
    return dict(sorted(by_tokens.items())) if len(by_tokens) >= 2 else None


def _null_measurement(result, metric, key):
    """(null value, the null's replicates) of one metric in one eval.json, (None, None) if absent."""
    r = (result or {}).get(metric) or {}
    value = (r.get("null") or {}).get(key)
    reps = ((r.get("null_uncertainty") or {}).get(key) or {}).get("replicates")
    reps = None if not reps else np.array([np.nan if v is None else v for v in reps], dtype=np.float64)
    return (value if _finite(value) else None), reps


def _validity(saes, metric):
    """'testable' when every seed's SAE is, else its reasons (each once)."""
    reasons = []
    for r in saes:
        validity = (r.get(metric) or {}).get("validity")
        if validity is None:
            return "not evaluated"
        reasons += [why for why in validity.get("reasons", []) if why not in reasons]
    return "testable" if not reasons else "untestable: " + "; ".join(reasons)


def budget_curve(by_tokens):
    """The validity gate's table: for each training budget and SAE, L0, EV, mean full absorption
    and its null with intervals (seeds and evaluation sample), score − null paired replicate by
    replicate, the main latents' F1 against the letter labels, the letters passing the probe gate,
    and the validity verdicts of absorption and OOD (the gap and its null where evaluated)."""
    header = ("| training tokens | SAE | seeds | L0 | EV | Mean full absorption [95% CI] | its null [95% CI] | "
              "score − null [95% CI] | main latents' F1 | letters | absorption | OOD gap (k=128) [95% CI] | "
              "its null | OOD |")
    lines = [header, "|---" * 14 + "|"]
    for tokens, arm in by_tokens.items():
        for name in dict.fromkeys(n for saes in arm.values() for n in saes):
            pick = lambda saes: saes.get(name)
            saes = [pick(s) for s in arm.values() if pick(s) is not None]
            cells = []
            for metric, key in (("absorption", "mean_full_absorption_score"), ("ood", "gap_k128")):
                null = _null_per_seed(arm, pick, metric, key)
                both = paired(null, _per_seed(arm, pick, _full_label(metric, key)))
                cells.append([_cell(both["other"]), _cell(both["base"]) if null else "—",
                              _delta_cell(both["delta"]) if null else "—"])
            f1 = [((r.get("absorption") or {}).get("diagnostics") or {}).get("main_latents_f1") for r in saes]
            f1 = [v for v in f1 if _finite(v)]
            letters = sorted({(r.get("absorption") or {}).get("n_letters_kept") for r in saes} - {None})
            core = [((r.get("core") or {}).get("l0"), (r.get("core") or {}).get("explained_variance")) for r in saes]
            l0, ev = (np.mean([c[i] for c in core if _finite(c[i])]) if any(_finite(c[i]) for c in core)
                      else None for i in (0, 1))
            ood = ((cells[1][0], cells[1][1], _validity(saes, "ood")) if any("ood" in r for r in saes)
                   else ("not evaluated", "—", "—"))
            lines.append(f"| {tokens:,} | {name} | {len(saes)} | {_fmt(l0)} | {_fmt(ev)} | {cells[0][0]} | "
                         f"{cells[0][1]} | {cells[0][2]} | {_fmt(np.mean(f1)) if f1 else '—'} | "
                         f"{', '.join(map(str, letters)) or '—'} | {_validity(saes, 'absorption')} | "
                         f"{ood[0]} | {ood[1]} | {ood[2]} |")
    return "\n".join(lines)


def budget_report(by_tokens, arms):
    return ("# The validity gate: one arm at several training budgets\n\nThe arms differ in training tokens "
            "alone, so there is no baseline-vs-masked verdict here: the table says at which budget each "
            "metric becomes measurable (its score clearly on the right side of its null, and for absorption "
            "main latents that find the letters). Intervals: 95%, seeds and evaluation sample (one seed: the "
            "sample's alone); score − null pairs the bootstrap replicates.\n\n"
            f"{budget_curve(by_tokens)}\n\n## What these numbers rest on\n\n{caveats(arms)}\n")


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot written")
        return None
    return plt


def _save_png(plt, fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())
    print(f"wrote {path}")


def _null_per_seed(arm, pick, metric, key):
    """{seed: (null value, its replicates)} where the seed's SAE has a null."""
    null = {seed: _null_measurement(pick(saes), metric, key) for seed, saes in arm.items() if pick(saes) is not None}
    return {seed: v for seed, v in null.items() if v[0] is not None}


def plot_budget(by_tokens, path):
    """One PNG: mean full absorption and its null against training tokens (log axis), per SAE name,
    with their 95% intervals. Skipped (with a note) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return
    label = _full_label("absorption", "mean_full_absorption_score")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    names = list(dict.fromkeys(n for arm in by_tokens.values() for saes in arm.values() for n in saes))
    for i, name in enumerate(names):
        pick = lambda saes: saes.get(name)
        for which, style in (("SAE", dict(marker="o")), ("null", dict(marker="o", mfc="none", linestyle=":"))):
            points = []
            for tokens, arm in by_tokens.items():
                s = summary(_per_seed(arm, pick, label) if which == "SAE" else
                            _null_per_seed(arm, pick, "absorption", "mean_full_absorption_score"))
                if s["n"]:
                    err = [0.0, 0.0] if s["lo"] is None else [s["mean"] - s["lo"], s["hi"] - s["mean"]]
                    points.append((tokens, s["mean"], err))
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=np.array([p[2] for p in points]).T,
                            capsize=3, color=f"C{i}", label=f"{name}" + (": null" if which == "null" else ""), **style)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per SAE")
    ax.set_title(f"{label}: SAE (filled) and its null (hollow), 95% intervals", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(plt, fig, path)


def plot_comparison(arms, path):
    """One PNG: a panel per primary metric (Mean full absorption, OOD gap) and EV against measured
    L0 (log axis): per arm a point per SAE name at the seeds' mean L0 with its two-level 95%
    interval, and the null at the same L0 as a hollow marker. Skipped (with a note) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return
    import matplotlib.ticker
    panels = [_full_label(m, k) for m, k in dict.fromkeys((m, k) for m, k, _, _ in PRIMARY)]
    panels.append(_full_label("core", "explained_variance"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, label in zip(axes, panels):
        drawn = False
        for i, (arm, by_seed) in enumerate(arms.items()):
            points = []
            for name in dict.fromkeys(n for saes in by_seed.values() for n in saes):
                pick = lambda saes: saes.get(name)
                s = summary(_per_seed(by_seed, pick, label))
                l0, null = _mean_l0(by_seed, pick), _mean_null(by_seed, pick, label)
                if s["n"] and l0:
                    err = [0.0, 0.0] if s["lo"] is None else [s["mean"] - s["lo"], s["hi"] - s["mean"]]
                    points.append((l0, s["mean"], err, null))
            if points:
                points.sort()
                color = f"C{i}"
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=np.array([p[2] for p in points]).T,
                            marker="o", capsize=3, color=color, label=f"{arm} ({len(by_seed)} seed(s))")
                nulls = [(p[0], p[3]) for p in points if p[3] is not None]
                if nulls:
                    ax.plot(*zip(*nulls), linestyle=":", marker="o", mfc="none", color=color, label=f"{arm}: null")
                drawn = True
        if drawn:
            ax.set_xscale("log")  # ticks at 1, 2, 5 x 10^n: labelled minor ticks overlap
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("L0 (clean text)")
    for ax in axes:  # the first panel with data carries the legend
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    fig.suptitle("mean over seeds; bars: 95% interval with the seeds and the evaluation sample; hollow: the null "
                 "(no learned structure, same L0)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save_png(plt, fig, path)


def report(by_run, comparison_file, matched_points=3):
    """The per-run tables on stdout and, with two or more arms, comparison_file and its PNG."""
    for run, saes in by_run.items():
        print(run_table(run, saes) + "\n")
    arms = group_arms(by_run)  # runs grouped by their SAE cfgs, paired by (seed, SAE name)
    by_tokens = budget_arms(arms)
    if by_tokens or len(arms) >= 2:  # one arm at several budgets: the validity gate's curve, no verdict
        text = budget_report(by_tokens, arms) if by_tokens else comparison_report(arms, matched_points)
        _write_atomic(comparison_file, text)
        print(text)
        print(f"wrote {comparison_file}")
        png = os.path.splitext(comparison_file)[0] + ".png"
        if by_tokens:
            plot_budget(by_tokens, png)
        else:
            plot_comparison(arms, png)
    elif len(by_run) >= 2:
        print(f"note: every run is arm {next(iter(arms))}: no comparison (pass runs that differ in mask_prob)")


def main(argv):
    runs = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
    cfg = configurator.configure(globals(), [a for a in argv if a not in runs], __doc__)
    if not runs:
        raise ValueError("usage: python compare.py [config.py] [--key=value ...] out/<run> [out/<run> ...]")
    report(read_runs(runs), cfg.comparison_file, cfg.matched_points)


if __name__ == "__main__":
    configurator.run(main)
