"""
Evaluate sparse autoencoders with every metric the paper reports (arXiv 2604.06495 §3): core
reconstruction (L0, explained variance, CE loss recovered), Mean Full Absorption, sparse probing,
SCR, TPP, and OOD probing against a dense "oracle" probe. Each metric is SAEBench v0.6.0's
algorithm with its defaults (sae_bench/evals/<metric>/main.py), and SAE-Probes' for OOD
(Kantamneni, Engels et al., arXiv 2502.16681), reimplemented with numpy and torch. "§N" names a
section of this file: §0 what every metric shares (activations, pooling, probes), §1 core,
§2 absorption, §3 sparse probing, §4 SCR, §5 TPP, §6 OOD, §7 the evaluation datasets; "§N.M" is
step M of that metric, as its functions' docstrings spell it out. The README says where we still
differ from SAEBench and why. Every metric is a function on activations and an SAE; main() loads
the model, data and SAEs and composes them.

Run (from the repository root):
  python evaluate.py out/tiny                                   # every SAE under out/tiny, offline
  python evaluate.py out/tiny_p0 out/tiny                       # + the baseline-vs-masked table
  python evaluate.py configs/pythia160m.py out/pythia160m_p0 out/pythia160m_p0.3
  python evaluate.py out/tiny --metrics="['core']" --rerun=True

A positional folder is a run (one subfolder per SAE holding sae.safetensors + cfg.json, as
train.py writes them) or a single SAE folder; config files (*.py) and --key=value go to
configurator.py. Model and layer come from each SAE's cfg.json, the core eval text
from tokens_dir (the SAE cfg's "tokens_dir" when it records one, else --tokens_dir or a config).

Outputs: <sae>/eval.json (every number, the settings that produced it, and what was skipped; a
number that could not be computed is null, with its reason under "null_reasons"; under
"computed_from", per metric, the SAE file's sha256, the model, the data and the settings it was
computed from: a metric is reused only while they all match, else recomputed with a one-line
reason; a run still training is refused), and then compare.py's report: a table per run on
stdout and, with two or more arms, `comparison_file` (verdicts on the primary endpoints, each arm's
value with its null, paired Δ, intervals holding both the seeds and the evaluation sample) and a
PNG beside it (when matplotlib is installed). `python compare.py RUN...` redoes that report from
the eval.json files in seconds. Several seeds of both arms:
  for s in 0 1 2; do for p in 0.0 0.3; do
    python train.py --seed=$s --mask_prob=$p --out_dir=out/tiny_p${p}_s$s
  done; done
  python evaluate.py out/tiny_p0.0_s* out/tiny_p0.3_s*
LLM activations are cached in `cache_dir`, keyed by the model, the layer and the exact token
rows, so every SAE on one model/layer (and later runs) shares them; model-level probes are trained
once per invocation and seeded, so reruns reproduce them.

Data: prepare.py writes the evaluation sets into `eval_data_dir`, one folder per set (its setting
eval_sets names them; a missing file is an error that says which prepare.py command makes it):
  <name>/train.jsonl, <name>/test.jsonl   one JSON object per line: {"text": str, "label": str,
      "attr": str}; "attr" (optional) is the spurious attribute for SCR, e.g. gender or rating.
  OOD pairs (`ood_tasks`): an in-distribution and an OOD file, .jsonl as above or SAE-Probes'
      .csv / .csv.zst (columns prompt, target; .zst needs the zstandard package).
The offline default's stdlib_* sets come from Python's standard-library docstrings: which package
a docstring documents (5 classes), half of them rewritten as "#" comments (the spurious attribute
for SCR), and class-vs-function docstrings with an upper-cased or word-reversed copy as the OOD
shift. configs/saebench.py names SAEBench's hub datasets and SAE-Probes' OOD pairs instead.
"""
import contextlib
import copy
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import time
import uuid
import zlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

import compare
import configurator
import model as model_lib
import prepare
import sae as sae_lib
from compare import _ABLATION_LABELS, _write_atomic  # shared with the report stage, which never imports torch

# -----------------------------------------------------------------------------
# what to evaluate ("" / -1: read from each SAE's cfg.json)
model_dir = ""
layer = -1
tokens_dir = ""                    # prepare.py tokens for the core eval text; "" = the SAE cfg's
metrics = ["core", "absorption", "sparse_probing", "scr", "tpp", "ood"]
rerun = False                      # recompute metrics an eval.json already holds
eval_data_dir = "data/eval"        # the sets prepare.py wrote (its eval_sets)
cache_dir = "out/cache"            # LLM activations, shared by all SAEs on one model/layer
comparison_file = "out/comparison.md"  # compare.py's report of two or more arms, its PNG beside it
saebench_json_dir = ""             # each metric in SAEBench's schema too: "" = <sae>/saebench/<metric>.json,
                                   # a folder = SAEBench's layout there (<type>/<run>_<sae>_eval_results.json)
# system
device = "auto"                    # auto | cpu | cuda | cuda:N
llm_dtype = "auto"                 # float32 | bfloat16 | auto (model.resolve_dtype: bf16 for Gemma on CUDA
                                   # and on CPUs with bf16 matrix units, else fp32; the log says which)
sae_dtype = "float32"              # SAEBench casts the SAE to the LLM dtype: "bfloat16" matches it
llm_batch_rows = 32                # rows per LLM forward when harvesting probe data
sae_batch_tokens = 4096            # tokens per SAE encode call
eval_seed = 42                     # SAEBench's seed (§0); train.py's `seed` is another setting
bootstrap_samples = 1000           # resamples of each metric's evaluation sample (§0: sampling error)
# core (§1)
core_dataset = "val"               # "val" = tokens_dir/val.bin; else a text dataset folder ("openwebtext")
core_ctx = 128                     # BOS + 127 tokens per row
core_batch_rows = 8                # SAEBench: 16; the legacy EV's batch mean depends on it
core_tokens = 16_384               # sparsity / variance / density tokens (SAEBench: 4,096,000)
core_ce_tokens = 2_048             # CE loss recovered and KL tokens (SAEBench: 409,600)
# absorption (§2)
absorption_icl_examples = 10
absorption_max_k = 10
absorption_f1_jump = 0.03
absorption_probe_f1_gate = 0.6     # letters whose ground-truth probe F1 is lower are dropped
absorption_min_letters = 20        # fewer kept letters: a warning (SAEBench aborts)
absorption_min_letter_tokens = 10  # letters with fewer vocabulary tokens are skipped (small tokenizers)
absorption_max_words = 10_000      # 0 = every alphabetic token (SAEBench); else a seeded sample of this many
absorption_cos_full = 0.025
absorption_cos_fraction = 0.1
absorption_projection_share = 0.4
absorption_max_absorbers = 3
absorption_min_main_f1 = 0.5       # validity: main latents' mean F1 against the letter labels below this = untestable
absorption_sensitivity = False     # + the score under centred P, scale-normalised probe latents, another probe seed;
                                   # off by default: at 10,000 words their two k-sparse probe refits cost as much as
                                   # SAEBench's figure and its null together (~50 s an SAE on 2 loaded cores, README)
# sparse probing (§3): (task name, dataset folder, classes)
probing_tasks = [  # prepare.py's sae_probes_probing: AG News topics, then three binary tasks
    ("ag_news_topics", "sae_probes_probing/ag_news", ["business", "scitech", "sports", "world"]),
    ("offensive_tweets", "sae_probes_probing/offensive", ["offensive", "other"]),
    ("human_or_gpt3", "sae_probes_probing/ai_text", ["human", "gpt3"]),
    ("clickbait_headlines", "sae_probes_probing/clickbait", ["clickbait", "factual"])]
probing_train_per_class = 500      # train texts per class and one-vs-rest probe (SAEBench: 2000; at most
                                   # 5 latents a probe, and the encode of every token is the cost; clickbait has ~300)
probing_test_per_class = 500       # test texts per class and one-vs-rest probe (SAEBench: 500)
probing_ctx = 128
probing_ks = [1, 2, 5]
# SCR (§4): (dataset folder, class 1, class 2, attribute 1, attribute 2); TPP (§5): as probing_tasks
scr_runs = [  # ETHICS: the act is wrong or not x the text is a Reddit post or a one-line scenario
    ("sae_probes_ethics", "wrong", "not_wrong", "reddit", "short")]
scr_train_per_cell = 150
scr_test_per_cell = 50
scr_probe_batch = 16               # controls how much of the spurious signal the probe learns (§4)
tpp_tasks = probing_tasks[:1]      # AG News: on a binary task the other class's probe is the same
                                   # split mirrored, so TPP's intended and unintended effects cancel
ablation_ns = [2, 5, 10, 20, 50, 100, 500]
headline_n = 20
ablation_positions = "valid"       # "valid": ablate at a text's valid positions only (§4.4, our
                                   # default); "saebench": reproduce SAEBench's figure, whose zeroed
                                   # BOS/pad rows are still encoded, so a latent firing on 0 shifts them
# OOD probing (§6): (task name, ID file, OOD file), paths under eval_data_dir
ood_tasks = [(name, f"sae_probes_ood/id/{name}.jsonl", f"sae_probes_ood/ood/{name}.jsonl") for name in (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "66_living-room",
    "67_social-security", "73_control-group", "87_glue_cola", "90_glue_qnli")]
ood_max_tokens = 128
ood_ks = [128, 16]
ood_pool_rows = 1_500              # training rows come from the first ood_pool_rows ID rows (SAE-Probes: 1,500)
ood_train_per_class = 512          # SAE-Probes' 512 a class; C by find_best_reg, which at these sizes holds
                                   # out the last 100 rows as SAE-Probes' get_cv does (§6.5)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_EPS = 1e-8                        # §2: a main latent with |a| below this is silent
_PROMPT_SUFFIX = " has the first letter:"
_NULL_TOKENS = 16_384              # §0: tokens on which a null's L0 is matched and its threshold set
_CACHE_FORMAT = 2                  # cache key and eval.json: 2 = one-token reads run the last block there only


def _progress(desc, done, total, t0):
    """One line per ~10% of a long loop (and at its end)."""
    step = max(1, total // 10)
    if done == total or done % step == 0:
        print(f"  {desc}: {done}/{total} ({time.time() - t0:.0f} s)", flush=True)


def json_ready(value):
    """A copy of a result that json.dumps can write as standard JSON: a float that is not finite
    (NaN, inf) becomes null, and the dict holding it lists why under "null_reasons": the reason
    the metric gave, else what the value was. Returns (copy, whether anything was nulled)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, True
    if isinstance(value, (list, tuple)):
        items = [json_ready(v) for v in value]
        return [v for v, _ in items], any(nulled for _, nulled in items)
    if not isinstance(value, dict):
        return value, False
    given = value.get("null_reasons", {})
    out, reasons = {}, {}
    for key, v in value.items():
        if key == "null_reasons":
            continue
        out[key], nulled = json_ready(v)
        if nulled:
            reasons[key] = given.get(key, f"not a finite number ({v})" if isinstance(v, float)
                                     else "holds numbers that are not finite, written as null")
    if reasons:
        out["null_reasons"] = reasons
    return out, False


def bootstrap(statistic, sizes, n_boot=1000, seed=0):
    """Sampling error of a metric over its evaluation sample (§0): the items of each stratum (words
    of one letter, texts of one class, ...) are resampled with replacement within that stratum,
    n_boot times, and statistic(list of index arrays, one per stratum) is recomputed on each draw.
    The draws depend only on (seed, sizes), so two SAEs evaluated on the same sample get the same
    resamples, replicate by replicate: compare.py pairs replicate b of two arms. Returns the
    replicates, their standard deviation (the standard error) and the 2.5-97.5% percentile interval."""
    rng = np.random.default_rng(seed)
    replicates = np.array([statistic([rng.integers(0, n, n) for n in sizes]) for _ in range(n_boot)],
                          dtype=np.float64)
    finite = replicates[np.isfinite(replicates)]
    if len(finite) < 2:
        return dict(se=None, ci95=None, n_boot=n_boot, replicates=replicates.tolist())
    return dict(se=float(finite.std(ddof=1)), ci95=[float(v) for v in np.percentile(finite, [2.5, 97.5])],
                n_boot=n_boot, replicates=replicates.tolist())


@torch.no_grad()
def null_sae(sae, x, target_l0, seed=0, shared=None):
    """The reference with no learned structure a metric is read against (§0): the SAE's width, random
    unit decoder rows, encoder = decoder^T, b_dec = the mean of x and a global threshold calibrated
    so that it fires target_l0 latents per token on x (clean text), the same L0 as the SAE beside
    it. A metric that scores the trained SAE no better than this measures nothing learned.
    shared: a dict a metric keeps across its SAEs (one x): all but the threshold depends on the
    width and seed only, so the directions and x's sorted pre-activations are made once per width."""
    d, n_latents = sae.cfg["d_in"], sae.cfg["d_sae"]
    shared = {} if shared is None else shared
    if (d, n_latents, seed) not in shared:
        base = sae_lib.SAE(d, n_latents, arch="batchtopk", seed=seed)
        W = torch.randn(n_latents, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        W /= W.norm(dim=1, keepdim=True)
        base.W_dec.copy_(W.float())
        base.W_enc.copy_(W.T.float())
        base.b_dec.copy_(x.double().mean(0).float())
        shared[d, n_latents, seed] = base, sae_lib.sorted_positive_pre_acts(base, x)
    base, positive = shared[d, n_latents, seed]
    null = copy.deepcopy(base)
    null.cfg.update(k=max(1, min(n_latents, round(target_l0))), null=True, null_target_l0=float(target_l0))
    null.threshold.fill_(sae_lib.threshold_at_l0(positive, len(x), target_l0)[0])
    return null.to(sae.W_enc.device, sae.W_enc.dtype).eval()


def bootstrap_seed(cfg, metric):
    """The bootstrap seed of one metric: eval_seed and the metric's name only, never the SAE, so
    replicate b is the same resample for every SAE (and for its null) and arms pair by replicate."""
    return int(np.random.SeedSequence([cfg.eval_seed, zlib.crc32(metric.encode())]).generate_state(1)[0])


def uncertainty(statistic, sizes, cfg, metric, unit):
    """bootstrap() of one headline number as eval.json holds it: se, ci95, n_boot, what was
    resampled, and the replicates rounded to 6 significant digits."""
    b = bootstrap(statistic, sizes, cfg.bootstrap_samples, bootstrap_seed(cfg, metric))
    b["unit"] = unit
    b["replicates"] = [float(f"{v:.6g}") for v in b["replicates"]]
    return b


def paired_interval(a, b):
    """95% percentile interval of a − b over paired bootstrap replicates (same resample b in both),
    None when fewer than two replicates are finite in both."""
    d = np.asarray(a["replicates"], dtype=np.float64) - np.asarray(b["replicates"], dtype=np.float64)
    d = d[np.isfinite(d)]
    return [float(v) for v in np.percentile(d, [2.5, 97.5])] if len(d) >= 2 else None


@torch.no_grad()
def null_for(sae, x, cfg, shared=None):
    """(null SAE, its target L0): null_sae() at the SAE's own mean L0 on x (a metric's clean
    activations), seeded by eval_seed only, so every SAE of one width gets the same random
    directions (made once per width with `shared`). (None, L0) when the SAE is silent on x."""
    x = x[:_NULL_TOKENS]  # the first tokens: calibration holds their pre-activations in memory
    target = l0(encode(sae, x, cfg.sae_batch_tokens)) if len(x) else 0.0
    if target <= 0:
        return None, target
    return null_sae(sae, x.float(), target, cfg.eval_seed, shared), target


def _null_record(values, target, how):
    return {**values, "l0": target, "how": how}


# -----------------------------------------------------------------------------
# LLM activations (§0): BOS first, special positions dropped through m.valid_mask

def tokenize(tokenizer, texts, bos_id, max_len, keep="start"):
    """Token rows [BOS] + ids, at most max_len long, keeping the text's start (§3) or end (§6)."""
    rows = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids = enc.ids[:max_len - 1] if keep == "start" else enc.ids[len(enc.ids) - (max_len - 1):]
        rows.append([bos_id] + ids)
    return rows


@torch.no_grad()
def residuals(m, rows, layer, batch_rows, positions=None, desc="residuals"):
    """Residual stream after block `layer` (fp32, CPU) for token rows (lists of ids, right-padded).
    positions=None: every valid position (no BOS/EOS/pad), flattened to (N, d), plus the number of
    valid positions per row (n_rows,). Else one position per row, (n_rows, d). Rows are batched
    in order of length, so a batch pads little (texts of 15-130 tokens padded to their batch's
    longest cost twice their tokens); the outputs keep the rows' order."""
    device = next(m.parameters()).device
    pad_id = m.cfg.pad_token_id if m.cfg.pad_token_id is not None else m.cfg.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # stable: equal lengths keep their order
    out, t0 = [None] * len(rows), time.time()
    n_batches = math.ceil(len(rows) / batch_rows)
    for b, start in enumerate(range(0, len(rows), batch_rows)):
        which = order[start:start + batch_rows]
        width = max(len(rows[i]) for i in which)
        idx = torch.full((len(which), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(which), width), dtype=torch.long)
        for j, i in enumerate(which):
            idx[j, :len(rows[i])] = torch.tensor(rows[i])
            attention[j, :len(rows[i])] = 1
        idx, attention = idx.to(device), attention.to(device)
        if positions is None:
            resid = m.resid_post(idx, layer, attention).float()
            valid = m.valid_mask(idx, attention)
            for j, i in enumerate(which):
                out[i] = resid[j, valid[j]].cpu()
        else:  # the last block runs at these positions only (model.resid_post)
            pos = torch.tensor([positions[i] for i in which], device=device)
            for j, row in zip(which, m.resid_post(idx, layer, attention, pos).float().cpu()):
                out[j] = row
        _progress(desc, b + 1, n_batches, t0)
    if positions is None:
        return torch.cat(out), torch.tensor([len(a) for a in out], dtype=torch.long)
    return torch.stack(out)


def _process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def cached_residuals(llm, rows, name, positions=None):
    """residuals(), cached on disk under a hash of (format, model, layer, dtype, rows, positions):
    any change in data, tokenizer or selection gives a new key, so a stale cache is never read."""
    spec = json.dumps([_CACHE_FORMAT, llm.key, llm.layer, str(llm.dtype), positions, rows])
    digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
    path = os.path.join(llm.cache_dir, f"{name}-L{llm.layer}-{digest}.safetensors")
    if os.path.exists(path):
        try:
            tensors = load_file(path)
            return (tensors["acts"], tensors["counts"]) if "counts" in tensors else tensors["acts"]
        except Exception as e:  # a truncated or foreign file (safetensors has its own error types)
            print(f"  note: cache file {path} is unreadable ({e}); recomputing it")
    for tmp in glob.glob(glob.escape(path) + ".*.tmp"):  # _write_atomic's, of a killed evaluate.py
        if not _process_exists(int(tmp.split(".")[-2])):
            os.remove(tmp)
            print(f"  note: removed {tmp}, left by an evaluate.py that was killed while writing it")
    result = residuals(llm.m, rows, llm.layer, llm.batch_rows, positions, desc=f"LLM {name}")
    tensors = {"acts": result[0], "counts": result[1]} if positions is None else {"acts": result}
    _write_atomic(path, save(tensors))
    return result


@torch.no_grad()
def encode(sae, x, batch_tokens=4096):
    """sae.encode on (N, d) in chunks on the SAE's device and dtype; fp32 on the CPU."""
    w = sae.W_enc
    return torch.cat([sae.encode(chunk.to(w.device, w.dtype)).float().cpu()
                      for chunk in x.split(batch_tokens)]) if len(x) else torch.zeros(0, w.shape[1])


@torch.no_grad()
def mean_pool(acts, counts, sae=None, batch_tokens=4096):
    """§0 mean pooling over each text's valid positions; acts (N, d) grouped by counts (n_texts,).
    With an SAE, every position is encoded first and the latents are pooled (never the reverse).
    sae may be a list of nulls of one width (null_sae: they differ in their threshold alone): each
    chunk's pre-activations are then computed once for all of them, and a list is returned."""
    saes = sae if isinstance(sae, list) else [sae]
    first = saes[0]
    if len(saes) > 1 and not all(torch.equal(s.W_enc, first.W_enc) and torch.equal(s.b_enc, first.b_enc)
                                 and torch.equal(s.b_dec, first.b_dec) for s in saes):
        raise ValueError("mean_pool shares pre-activations only between SAEs that differ in their threshold alone")
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    width = acts.shape[1] if first is None else first.W_dec.shape[0]
    sums = [torch.zeros(len(counts), width, dtype=torch.float64) for _ in saes]
    for start in range(0, len(acts), batch_tokens):
        chunk = acts[start:start + batch_tokens]
        if len(saes) > 1:  # encode()'s last step, a ⊙ (a > θ), on the one shared a
            pre = first.pre_acts(chunk.to(first.W_enc.device)).float().cpu()
        for total, s in zip(sums, saes):
            if s is None:
                values = chunk
            elif len(saes) == 1:
                values = encode(s, chunk, batch_tokens)
            else:
                values = pre * (pre > s.threshold.cpu())
            total.index_add_(0, owner[start:start + batch_tokens], values.double())
    pooled = [(total / counts[:, None].double().clamp(min=1)).float() for total in sums]  # no valid token: 0
    return pooled if isinstance(sae, list) else pooled[0]


# -----------------------------------------------------------------------------
# Probes shared by every metric (§0): one logistic regression (L2 / L1), AUC, F1, and the
# minibatch probe SAEBench trains with Adam(W)

def logistic_regression(x, y, C=1.0, penalty="l2", balanced=False, max_iter=None, tol=1e-9):
    """Binary logistic regression in float64 with an unpenalised intercept (§0):
      L2: minimise 0.5‖w‖² + C·Σ s_i·logloss_i (sklearn's objective) by Newton's method;
      L1: minimise ‖w‖₁ + C·Σ s_i·logloss_i by FISTA (proximal gradient with momentum).
    s_i = n / (2·n_{y_i}) with balanced=True, else 1. Both stop when the (proximal) gradient is
    below tol × C·Σs, or after max_iter iterations (Newton 100, FISTA 5000).
    Returns (w (d,), b) as float64 tensors; for a sequence of C, (W (d, len(C)), b (len(C),)),
    each column the fit at its C (L1 runs them side by side, find_best_reg's whole grid at once)."""
    x = torch.as_tensor(x).double().numpy()
    y = torch.as_tensor(y).double().numpy()
    s = np.ones(len(y))
    if balanced:
        n_pos = y.sum()
        s = np.where(y > 0, len(y) / (2 * max(n_pos, 1)), len(y) / (2 * max(len(y) - n_pos, 1)))
    Cs = np.atleast_1d(np.asarray(C, dtype=np.float64))
    if penalty == "l2":  # from the smallest C up, each fit starting where the last one ended (warm start)
        fits, theta = {}, None
        for j in np.argsort(Cs, kind="stable"):
            fits[j] = theta = _newton_l2(x, y, s, Cs[j], max_iter or 100, tol, theta)
        w, b = np.stack([fits[j][:-1] for j in range(len(Cs))], 1), np.array([fits[j][-1] for j in range(len(Cs))])
    elif penalty == "l1":
        w, b = _fista_l1(x, y, s, Cs, max_iter or 5000, tol)
    else:
        raise ValueError(f"penalty must be 'l2' or 'l1', got {penalty!r}")
    if np.ndim(C) == 0:
        return torch.from_numpy(w[:, 0]), torch.tensor(b[0])
    return torch.from_numpy(w), torch.from_numpy(b)


def _sigmoid(z):
    return 0.5 + 0.5 * np.tanh(0.5 * z)  # one transcendental, no overflow (3x the speed of exp/logaddexp)


def _newton_l2(x, y, s, C, max_iter, tol, theta=None):
    """Newton with Armijo backtracking on 0.5‖w‖² + C·Σ s·logloss from theta (w then b; zeros when
    None); converges in ~10-20 steps from zeros, fewer from the fit at a neighbouring C.
    Returns the fitted theta."""
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], 1)

    def objective(theta):
        z = xb @ theta
        return 0.5 * theta[:d] @ theta[:d] + C * (s * (np.logaddexp(0, z) - y * z)).sum()

    theta = np.zeros(d + 1) if theta is None else theta
    value = objective(theta)
    for _ in range(max_iter):
        p = _sigmoid(xb @ theta)
        gradient = C * xb.T @ (s * (p - y))
        gradient[:d] += theta[:d]
        if np.abs(gradient).max() <= tol * max(1.0, C * s.sum()):
            break
        hessian = C * (xb.T * (s * p * (1 - p))) @ xb
        hessian[:d, :d] += np.eye(d)
        step = -np.linalg.solve(hessian + 1e-12 * np.eye(d + 1), gradient)
        if -(gradient @ step) <= 4 * np.finfo(float).eps * abs(value):
            break  # the Newton decrement is below the objective's float64 rounding: no step can show a gain
        t = 1.0
        while t > 1e-12:
            candidate = objective(theta + t * step)
            if candidate <= value + 1e-4 * t * (gradient @ step):
                break
            t /= 2
        if t <= 1e-12:
            break  # no further progress in float64
        theta, value = theta + t * step, candidate
    return theta


def _fista_l1(x, y, s, Cs, max_iter, tol):
    """FISTA with adaptive restart (O'Donoghue & Candès) on ‖w‖₁ + C·Σ s·logloss, for each C of
    Cs side by side: one column of weights per C, each with its own momentum, restarts and stop,
    a converged column dropped from the products. It runs on centred, unit-variance features, which
    leaves the objective unchanged (v_j = σ_j·w_j, the penalty becomes Σ|v_j|/σ_j, the intercept
    absorbs the means) but conditions it far better. On near-separable data at large C the optimum
    lies at very large weights and the fit stops at max_iter, as sklearn's saga (SAE-Probes' L1
    solver, max_iter 1000) does. Those fits are most of the OOD metric's time, so an iteration is
    two matrix products and a dozen small array operations: σ(u) = ½ + ½·tanh(u/2), and the step
    C/L is the same for every C (L ∝ C), folded into two vectors computed once."""
    n, d = x.shape
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    z = np.concatenate([(x - mean) / std, np.ones((n, 1))], 1)
    curvature = 0.25 * s.max() * np.linalg.eigvalsh(z.T @ z)[-1]  # L = C·curvature, of ∇ C·Σ s·logloss
    lipschitz = Cs * curvature
    shrink = np.outer(np.append(1 / std, 0.0), 1 / lipschitz)   # the intercept is not penalised
    half_z = 0.5 * z
    scale, offset = 0.5 * s / curvature, s * (0.5 - y) / curvature  # gradient/L = z.T @ (scale·tanh(u) + offset)
    stop = tol * np.maximum(1.0, Cs * s.sum()) / lipschitz        # on the mapping L·(ahead − new)
    theta = np.zeros((d + 1, len(Cs)))
    ahead, t = theta.copy(), np.ones(len(Cs))
    active = np.arange(len(Cs))
    for _ in range(max_iter):
        a = ahead[:, active]
        new = a - z.T @ (scale[:, None] * np.tanh(half_z @ a) + offset[:, None])
        bound = shrink[:, active]
        new -= np.clip(new, -bound, bound)                      # soft threshold: the proximal step
        diff, move = a - new, new - theta[:, active]
        t_a = np.where(np.einsum("ij,ij->j", diff, move) > 0, 1.0, t[active])  # momentum uphill: restart
        t_next = (1 + np.sqrt(1 + 4 * t_a * t_a)) / 2
        ahead[:, active] = new + ((t_a - 1) / t_next) * move
        theta[:, active], t[active] = new, t_next
        active = active[np.abs(diff).max(0) > stop[active]]
        if not len(active):
            break
    w = theta[:d] / std[:, None]
    return w, theta[d] - mean @ w


def roc_auc(scores, y):
    """Area under the ROC curve by ranks, ties averaged (the Mann-Whitney U statistic)."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_score(predicted, actual):
    """Binary F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to find or predict."""
    predicted, actual = np.asarray(predicted, bool), np.asarray(actual, bool)
    tp = np.sum(predicted & actual)
    wrong = np.sum(predicted != actual)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def accuracy(w, b, x, y, weights=None):
    """Accuracy of the linear probe logit = x·w + b > 0 (probability 0.5). weights (n,) (how often
    a bootstrap drew each row): the weighted accuracy; (n_boot, n): one per replicate, an array."""
    logits = torch.as_tensor(x, dtype=torch.float64) @ torch.as_tensor(w, dtype=torch.float64) + float(b)
    correct = ((logits > 0) == torch.as_tensor(y).bool()).double()
    if weights is None:
        return float(correct.mean())
    weights = torch.as_tensor(weights, dtype=torch.float64)
    values = (weights @ correct / weights.sum(-1)).numpy()  # a replicate that drew no row: nan
    return float(values) if values.ndim == 0 else values


@contextlib.contextmanager
def _one_thread():
    """For tiny probe ops thread synchronisation costs more than it saves (40x on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_probe_sgd(x, y, epochs, batch_size, lr, weight_decay, decoupled=True, lr_end=None,
                    l1=0.0, pos_weight=None, x_test=None, y_test=None, patience=None, seed=0):
    """A minibatch linear probe as SAEBench trains them (§2.2-3, §3.5, §4). y: (n,) or (n, C) in
    {0, 1}. Loss: BCE with logits (pos_weight per output) + l1·(mean over outputs of Σ|w|).
    AdamW (decoupled=True) or Adam with its L2 weight decay; lr decays exponentially to lr_end
    over the epochs when given. With test data the epoch of best test accuracy is kept, which
    is optimistic, exactly as SAEBench does; `patience` epochs without a gain stop training.
    Returns (weight (C, d) or (d,), bias (C,) or scalar, best test accuracy or None)."""
    single = y.dim() == 1
    targets = y.float().reshape(len(y), -1)
    x = x.float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Linear(x.shape[1], targets.shape[1])
    generator = torch.Generator().manual_seed(seed)
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        probe.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = (lr_end / lr) ** (1 / epochs) if lr_end else 1.0
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    best, best_state, stale = -1.0, None, 0
    with _one_thread():
        for _ in range(epochs):
            with torch.enable_grad():
                for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                    loss = bce(probe(x[batch]), targets[batch])
                    if l1:
                        loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            scheduler.step()
            if x_test is None:
                continue
            with torch.no_grad():
                predicted = (probe(x_test.float()) > 0).float()
            test_accuracy = float((predicted == y_test.float().reshape(len(y_test), -1)).float().mean())
            if test_accuracy > best:
                best, best_state, stale = test_accuracy, copy.deepcopy(probe.state_dict()), 0
            else:
                stale += 1
                if patience and stale >= patience:
                    break
    if best_state is not None:
        probe.load_state_dict(best_state)
    weight, bias = probe.weight.detach(), probe.bias.detach()
    if single:
        weight, bias = weight[0], bias[0]
    return weight, bias, (best if x_test is not None else None)


# -----------------------------------------------------------------------------
# §1 Core: sparsity, reconstruction, CE loss recovered, latent density

def l0(f):
    """Mean number of non-zero latents per token, for f of any shape (..., F) (§1.2)."""
    return float((f != 0).sum(-1).double().mean())


def new_core_sums(d_in, d_sae):
    """float64 accumulators for add_core_batch (§1.3)."""
    zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    return dict(tokens=0, batches=0, l0=0.0, l1=0.0, s1=zeros(d_in), s2=0.0, sse=0.0,
                ev_legacy=0.0, sse_per_batch=0.0, s2_per_batch=0.0,
                cossim=0.0, l2_ratio=0.0, l2_in=0.0, l2_out=0.0, rel_bias=0.0, fired=zeros(d_sae))


@torch.no_grad()
def add_core_batch(sums, x, f, x_hat):
    """Add one batch: x, f = encode(x), x_hat = decode(f) at the batch's valid positions (§1.1-6)."""
    x, f, x_hat = x.double(), f.double(), x_hat.double()
    n = len(x)
    err = (x - x_hat).pow(2).sum(1)              # ‖x_t − x̂_t‖²
    sq = x.pow(2).sum(1)                         # ‖x_t‖²
    centred = (x - x.mean(0)).pow(2).sum(1)      # ‖x_t − μ_b‖², μ_b = this batch's mean
    norm_in, norm_out = x.norm(dim=1), x_hat.norm(dim=1)
    sums["tokens"] += n
    sums["batches"] += 1
    sums["l0"] += l0(f) * n
    sums["l1"] += f.sum().item()
    sums["s1"] += x.sum(0)
    sums["s2"] += sq.sum().item()
    sums["sse"] += err.sum().item()
    sums["ev_legacy"] += (1 - err / centred).sum().item()
    sums["sse_per_batch"] += err.sum().item() / n       # SSE_b / N_b
    sums["s2_per_batch"] += sq.sum().item() / n
    sums["cossim"] += ((x * x_hat).sum(1) / (norm_in * norm_out).clamp(min=1e-12)).sum().item()
    sums["l2_ratio"] += (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum().item()
    sums["l2_in"] += norm_in.sum().item()
    sums["l2_out"] += norm_out.sum().item()
    sums["rel_bias"] += (norm_out.pow(2).mean() / (x * x_hat).sum(1).mean()).item()
    sums["fired"] += (f > 0).sum(0)


def finish_core(sums):
    """§1.4-6, §1.8 from the accumulators. Three explained-variance forms, labelled (§1.5)."""
    n, b, d = sums["tokens"], sums["batches"], len(sums["s1"])
    total_variance = sums["s2"] - sums["s1"].pow(2).sum().item() / n  # Σ‖x − x̄‖², x̄ global mean
    q = sums["s2_per_batch"] / (b * d)  # SAELens squares a mean *square* here (§1.5)
    density = sums["fired"] / n
    return {
        "tokens": n,
        "l0": sums["l0"] / n,
        "l1": sums["l1"] / n,
        "mse": sums["sse"] / (n * d),
        "mse_saebench": sums["sse_per_batch"] / n,  # mean over tokens of ‖x_t − x̂_t‖²/N_b (§1.4)
        "explained_variance": 1 - sums["sse"] / total_variance,
        "explained_variance_legacy": sums["ev_legacy"] / n,
        "explained_variance_saebench_current":
            1 - (sums["sse_per_batch"] / b) / (sums["s2_per_batch"] / b - q * q),
        "cossim": sums["cossim"] / n,
        "l2_ratio": sums["l2_ratio"] / n,
        "l2_norm_in": sums["l2_in"] / n,
        "l2_norm_out": sums["l2_out"] / n,
        "relative_reconstruction_bias": sums["rel_bias"] / b,
        "frac_alive": float((density > 0).double().mean()),
        "frac_dense_above_10pct": float((density > 0.1).double().mean()),
        "frac_dense_above_1pct": float((density > 0.01).double().mean()),
        "latent_density": density.tolist(),
    }


def _next_token_sums(logprobs, idx, valid, clean_valid):
    """(Σ next-token CE, Σ KL(p_clean ‖ p)) over the valid positions (§1.7), valid (B, T);
    clean_valid: (the clean pass's log-probabilities at the valid positions, their exp), computed
    once per batch. The CE gathers each position's one log-probability before masking:
    a (B·T, vocabulary) copy of 262k-token logits costs seconds on a CPU.
    The CE at t scores token t+1, so the last position has none and drops out of the CE only;
    the KL compares two distributions and counts at every valid position, the last included, as
    SAEBench does (sae_bench/evals/core/main.py, get_downstream_reconstruction_metrics: it
    shortens the mask by one only for the metric that is one position shorter, the CE)."""
    ce = -logprobs[:, :-1].gather(2, idx[:, 1:, None])[..., 0][valid[:, :-1]].sum()
    clean, clean_p = clean_valid
    kl = (clean_p * (clean - logprobs[valid])).sum()
    return ce.item(), kl.item()


@torch.no_grad()
def core_metrics(m, layer, saes, rows, batch_rows=16, ce_rows=None, batch_tokens=4096):
    """§1 for several SAEs at once (one LLM pass per batch serves all of them).
    rows: (n, T) token ids, BOS first. The first ce_rows rows (all if None) also get the CE/KL
    passes: the SAE's x̂ spliced in at valid positions (special positions keep their activation)
    and a zero-ablation of every position. Returns one dict per SAE."""
    device = next(m.parameters()).device
    ce_rows = len(rows) if ce_rows is None else ce_rows
    sums = [new_core_sums(m.cfg.d_model, sae.W_dec.shape[0]) for sae in saes]
    fired_ema = [0] * len(saes)  # firings at the EMA θ where cfg.json records one (train.py calibrates)
    clean_ce = zero_ce = zero_kl = ce_tokens = kl_tokens = 0.0
    sae_ce, sae_kl = [0.0] * len(saes), [0.0] * len(saes)
    n_batches, t0 = math.ceil(len(rows) / batch_rows), time.time()
    for b, start in enumerate(range(0, len(rows), batch_rows)):
        idx = torch.as_tensor(rows[start:start + batch_rows], dtype=torch.long).to(device)
        resid = m.resid_post(idx, layer)
        valid = m.valid_mask(idx)
        x = resid[valid].float()
        with_ce = start < ce_rows
        if with_ce:
            clean = F.log_softmax(m.forward_from(resid, layer).float(), -1)
            ce_tokens += valid[:, :-1].sum().item()  # loss at t predicts t+1; counted where t is valid
            kl_tokens += valid.sum().item()
            at_valid = clean[valid]
            clean_valid = (at_valid, at_valid.exp())  # the KL's reference for every pass below
            clean_ce += _next_token_sums(clean, idx, valid, clean_valid)[0]
            del clean
            zero = F.log_softmax(m.forward_from(torch.zeros_like(resid), layer).float(), -1)
            ce, kl = _next_token_sums(zero, idx, valid, clean_valid)
            zero_ce, zero_kl = zero_ce + ce, zero_kl + kl
            del zero
        for i, sae in enumerate(saes):
            w = sae.W_enc
            f = torch.cat([sae.encode(c.to(w.device, w.dtype)) for c in x.split(batch_tokens)])
            x_hat = sae.decode(f).float().to(device)
            add_core_batch(sums[i], x, f, x_hat)
            if sae.cfg.get("threshold_ema") is not None:
                fired_ema[i] += sum(int((sae.pre_acts(c.to(w.device, w.dtype)) > sae.cfg["threshold_ema"]).sum())
                                    for c in x.split(batch_tokens))
            if with_ce:
                spliced = resid.clone()
                spliced[valid] = x_hat.to(resid.dtype)
                logprobs = F.log_softmax(m.forward_from(spliced, layer).float(), -1)
                ce, kl = _next_token_sums(logprobs, idx, valid, clean_valid)
                sae_ce[i], sae_kl[i] = sae_ce[i] + ce, sae_kl[i] + kl
        _progress("core", b + 1, n_batches, t0)
    results = []
    for i in range(len(saes)):
        r = finish_core(sums[i])
        ce_clean, ce_zero, ce_sae = clean_ce / ce_tokens, zero_ce / ce_tokens, sae_ce[i] / ce_tokens
        kl_zero, kl_sae = zero_kl / kl_tokens, sae_kl[i] / kl_tokens
        # "Recovered" measures the way from the ablated loss back to the clean one; when ablating
        # does not raise the loss (a random model can do that) the ratio has no meaning and can
        # even flip sign, so it is left out rather than reported (the random tiny model: 8.355
        # ablated vs 8.368 clean).
        ce_score = _ratio(ce_zero - ce_sae, ce_zero - ce_clean) if ce_zero > ce_clean else float("nan")
        r.update(ce_tokens=int(ce_tokens), kl_tokens=int(kl_tokens), ce_loss_without_sae=ce_clean,
                 ce_loss_with_sae=ce_sae, ce_loss_with_ablation=ce_zero, ce_loss_score=ce_score,
                 delta_lm_loss=ce_sae - ce_clean, kl_div_with_sae=kl_sae, kl_div_with_ablation=kl_zero,
                 kl_div_score=_ratio(kl_zero - kl_sae, kl_zero))
        reasons = {}
        if ce_zero <= ce_clean:
            reasons["ce_loss_score"] = (f"zero-ablating the layer does not raise the LM loss ({ce_zero:.4f} "
                                        f"ablated vs {ce_clean:.4f} clean), so there is nothing to recover")
        if kl_zero == 0:
            reasons["kl_div_score"] = "zero-ablating the layer leaves the model's output unchanged, so 0/0"
        if reasons:
            r["null_reasons"] = reasons
        # the inference threshold the SAE used ("l0" is its L0), the other one, and the EMA one's L0 here
        r.update({key: saes[i].cfg[key] for key in ("threshold_used", "threshold_ema", "threshold_calibrated")
                  if key in saes[i].cfg})
        if saes[i].cfg.get("threshold_ema") is not None:
            r["l0_threshold_ema"] = fired_ema[i] / r["tokens"]
        results.append(r)
    return results


def _ratio(numerator, denominator):
    """numerator / denominator, NaN for 0/0-style cases (eval.json then says why: json_ready)."""
    return numerator / denominator if denominator != 0 else float("nan")


def core_rows(llm, cfg):
    """(n, core_ctx) rows of BOS + 127 tokens from a flat token stream (documents joined by EOS),
    shuffled with the seed (§1). Source: tokens_dir/val.bin or a text dataset folder."""
    per_row = cfg.core_ctx - 1
    if cfg.core_dataset == "val":
        if not llm.tokens_dir:
            raise ValueError("core_dataset='val' needs tokens_dir: pass --tokens_dir=... or a config file "
                             "(the SAE's cfg.json records no tokens_dir)")
        stream, meta = prepare.open_tokens(llm.tokens_dir, "val")
        with open(os.path.join(llm.model_dir, "tokenizer.json"), "rb") as f:
            tokenizer_sha256 = hashlib.sha256(f.read()).hexdigest()
        if (meta.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256
                or meta["eos_token_id"] != llm.m.cfg.eos_token_id):
            raise ValueError(f"{llm.tokens_dir} was not tokenized with {llm.model_dir}/tokenizer.json "
                             "(meta.json's tokenizer_sha256 / eos_token_id differ): pass the matching "
                             "--tokens_dir or config file")
    else:
        texts = [r["text"] for r in prepare.read_eval_rows(cfg.eval_data_dir, f"{cfg.core_dataset}/train.jsonl")]
        ids = [i for enc in llm.tokenizer.encode_batch(texts, add_special_tokens=False)
               for i in enc.ids + [llm.m.cfg.eos_token_id]]
        stream = np.asarray(ids, dtype=np.int64)
    n_available = len(stream) // per_row
    if n_available == 0:
        raise ValueError(f"the core text has {len(stream)} tokens, fewer than one row of {cfg.core_ctx}")
    n_rows = max(cfg.core_tokens, cfg.core_ce_tokens) // cfg.core_ctx
    if n_available < n_rows:
        print(f"  note: core text has {n_available * cfg.core_ctx:,} tokens, fewer than the "
              f"{n_rows * cfg.core_ctx:,} asked for: using them all")
    order = np.random.default_rng(cfg.eval_seed).permutation(n_available)[:n_rows]
    rows = np.stack([np.asarray(stream[i * per_row:(i + 1) * per_row], dtype=np.int64) for i in order])
    return np.concatenate([np.full((len(rows), 1), llm.m.cfg.bos_token_id), rows], 1)


def run_core(llm, saes, cfg):
    # CE/KL run on the first core_ce_tokens of the shuffled rows, the sparsity and variance
    # metrics on all of them (core_tokens; the larger of the two if they were swapped)
    rows = core_rows(llm, cfg)
    n_ce = min(len(rows), cfg.core_ce_tokens // cfg.core_ctx)
    results = core_metrics(llm.m, llm.layer, saes, rows, cfg.core_batch_rows, n_ce, cfg.sae_batch_tokens)
    for r in results:
        if r["explained_variance_saebench_current"] > 1:  # §1.5: its denominator subtracts a squared mean square
            r["explained_variance_saebench_current_note"] = (
                "above 1: SAEBench's current formula subtracts the square of a mean *square* (§1.5), "
                "and here that left its denominator negative; explained_variance (1 - SSE / total "
                "variance) is the one reported")
    return results


# -----------------------------------------------------------------------------
# §2 Feature absorption: Mean Full Absorption and absorption fraction (SAEBench projection variant)

def absorption_vocabulary(tokenizer):
    """§2.1: (token id, word, letter index) for tokens that are purely [a-zA-Z] once a leading
    Ġ/▁ is read as a space and at most one leading space is stripped. The word keeps its space,
    so the prompt reproduces the token. (The "[\\d<>]" exclusion is implied by [a-zA-Z] only.)"""
    vocabulary = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        word = tokenizer.id_to_token(token_id)
        if word is None:
            continue
        if word[:1] in ("Ġ", "▁"):
            word = " " + word[1:]
        bare = word[1:] if word.startswith(" ") else word
        if bare and bare.isascii() and bare.isalpha():
            vocabulary.append((token_id, word, _LETTERS.index(bare[0].lower())))
    return vocabulary


def first_letter_prompt(word, examples):
    """§2: ICL lines "{w} has the first letter: {W}" joined by "\\n" (one before the first too),
    then "{word} has the first letter:"."""
    lines = [f"{w}{_PROMPT_SUFFIX} {w.strip()[0].upper()}" for w in examples]
    return "\n" + "\n".join(lines) + "\n" + word + _PROMPT_SUFFIX


def absorption_prompts(tokenizer, bos_id, entries, example_words, n_examples, rng):
    """Token rows and word positions for ICL prompts, one per (token id, word, letter) entry,
    with examples drawn from example_words (never the word itself). A prompt whose tokenization
    does not put the word's own token just before the suffix is dropped (keep[i] False). Each row
    ends at the word: in a causal model the suffix after it cannot change the residual read there."""
    suffix_len = len(tokenizer.encode(_PROMPT_SUFFIX, add_special_tokens=False).ids)
    texts = []
    for _, word, _ in entries:
        pool = rng.sample(example_words, min(len(example_words), n_examples + 1))
        texts.append(first_letter_prompt(word, [w for w in pool if w != word][:n_examples]))
    rows, positions, keep = [], [], []
    for (token_id, _, _), enc in zip(entries, tokenizer.encode_batch(texts, add_special_tokens=False)):
        row = [bos_id] + enc.ids
        pos = len(row) - 1 - suffix_len
        keep.append(row[pos] == token_id)
        if keep[-1]:
            rows.append(row[:pos + 1])
            positions.append(pos)
    return rows, positions, np.array(keep, dtype=bool)


def letter_probe(x, letters, epochs=50, batch_size=64, lr=1e-2, lr_end=1e-5, weight_decay=1e-4,
                 l1=0.0, seed=0):
    """§2.2-3: 26 one-vs-rest logistic outputs, BCE with pos_weight = n_neg/n_pos per letter,
    Adam with lr decaying exponentially from lr to lr_end. Returns (W (26, d), b (26,))."""
    targets = F.one_hot(torch.as_tensor(letters), len(_LETTERS)).float()
    n_pos = targets.sum(0)
    pos_weight = (len(targets) - n_pos) / n_pos.clamp(min=1)
    w, b, _ = train_probe_sgd(x, targets, epochs, batch_size, lr, weight_decay, decoupled=False,
                              lr_end=lr_end, l1=l1, pos_weight=pos_weight, seed=seed)
    return w, b


def main_latents_from_f1(f1_by_k, latents_by_k, jump=0.03):
    """§2.4 F1-jump rule: grow k while F1_k > best-so-far + jump; the last accepted latents win."""
    previous, main = -100.0, []
    for f1, latents in zip(f1_by_k, latents_by_k):
        if f1 <= previous + jump:
            break
        previous, main = f1, list(latents)
    return main


def k_sparse_main_latents(f_train, letters_train, f_test, letters_test, evaluated_letters,
                          max_k=10, jump=0.03, seed=0):
    """§2.3-4: a 26-way L1 probe on the SAE latents ranks latents per letter by signed weight;
    for k = 1..max_k a balanced L2 logistic regression on the top-k latents gives test F1_k;
    the F1-jump rule picks the main (split) latents. Returns {letter: (main, [F1_k])}."""
    # SAEBench's batch of 4096 assumes a vocabulary of ≥ ~25k words (≥ 6 steps an epoch, 300 in
    # all); a smaller vocabulary gets a smaller batch so the probe still takes ~300 steps and its
    # ranking is not just its random initialisation. Pythia and Gemma keep 4096.
    batch_size = min(4096, max(64, math.ceil(len(f_train) / 6)))
    weights, _ = letter_probe(f_train, letters_train, batch_size=batch_size, weight_decay=1e-6, l1=0.01,
                              seed=seed)
    letters_train, letters_test = np.asarray(letters_train), np.asarray(letters_test)
    result = {}
    for c in evaluated_letters:
        ranking = weights[c].argsort(descending=True)
        y_train, y_test = letters_train == c, letters_test == c
        f1s, latent_sets = [], []
        for k in range(1, min(max_k, f_train.shape[1]) + 1):
            chosen = ranking[:k]
            w, b = logistic_regression(f_train[:, chosen], y_train, C=1.0, balanced=True)
            predicted = (f_test[:, chosen].double() @ w + b > 0).numpy()
            f1s.append(f1_score(predicted, y_test))
            latent_sets.append(chosen.tolist())
        result[c] = (main_latents_from_f1(f1s, latent_sets, jump), f1s)
    return result


def probe_cosines(W_dec, probe_direction):
    """cos(p, W_dec[f]) for every latent f (F,), float64."""
    W_dec = W_dec.double()
    p = probe_direction.double() / probe_direction.double().norm()
    return (W_dec @ p) / W_dec.norm(dim=1).clamp(min=1e-12)


def word_absorption(x, latents, probe_direction, W_dec, main_latents, cos_full=0.025,
                    cos_fraction=0.1, projection_share=0.4, max_absorbers=3, centre=None):
    """§2.6-8 for the words of one letter. x (n, d) residuals at the word, latents = encode(x)
    (n, F), probe_direction (d,) the letter's ground-truth probe row, W_dec (F, d). centre (d,):
    the sensitivity row's P = (x − centre)·p; SAEBench's (None) projects raw x.
    Returns (full absorption (n,) bool, absorption fraction (n,) float64)."""
    x, latents = x.double(), latents.double()
    p = probe_direction.double() / probe_direction.double().norm()
    cos = probe_cosines(W_dec, probe_direction)                # cos(p, W_dec[f])
    projection = latents * cos                                 # proj_f = a_f·cos_f
    P = x @ p if centre is None else (x - centre.double()) @ p  # SAEBench: raw x, no bias, no centring
    main = torch.as_tensor(main_latents, dtype=torch.long)
    is_main = torch.zeros(len(cos), dtype=torch.bool)
    is_main[main] = True
    # full absorption: main latents silent, top projector aligned and carrying ≥ share of P
    top = projection.argmax(1)
    top_projection = projection.gather(1, top[:, None])[:, 0]
    full = ((latents[:, is_main].abs() < _EPS).all(1) & (cos[top] >= cos_full) & (P >= 0)
            & (top_projection >= projection_share * P))
    # absorption fraction: up to max_absorbers aligned, positive non-main latents share P with M
    M = projection[:, is_main].sum(1)
    candidates = torch.where(~is_main & (cos >= cos_fraction) & (projection > 0), projection, 0.0)
    A = candidates.topk(min(max_absorbers, candidates.shape[1]), dim=1).values.sum(1)
    absorbed = torch.minimum(A, P - M)
    fraction = torch.where((M >= P) | (A / P < projection_share), 0.0,
                           torch.where(M <= 0, 1.0, (absorbed / (absorbed + M)).clamp(0, 1)))
    return full, fraction


def aggregate_absorption(per_letter, f1_gate=0.6):
    """§2.9: per letter full rate = #full/n_tp and fraction = Σ fraction/n_tp; unweighted means
    over the letters whose ground-truth probe F1 exceeds the gate (and that have words).
    per_letter: {letter: dict(f1_probe, n_tp, n_full, fraction_sum, n_main)}."""
    kept = [c for c, r in per_letter.items() if r["f1_probe"] > f1_gate and r["n_tp"] > 0]
    def mean(key, per_word=True):
        values = [per_letter[c][key] / (per_letter[c]["n_tp"] if per_word else 1) for c in kept]
        return float(np.mean(values)) if values else float("nan")

    return dict(mean_full_absorption_score=mean("n_full"),
                mean_absorption_fraction_score=mean("fraction_sum"),
                mean_num_split_features=mean("n_main", per_word=False),
                letters_kept=[_LETTERS[c] for c in kept])


def latent_f1(active, y):
    """F1, precision and recall of "any of these latents fires" (active (n,) bool) against the
    ground-truth letter labels y (n,) bool."""
    active, y = np.asarray(active, bool), np.asarray(y, bool)
    tp = int(np.sum(active & y))
    precision = tp / int(active.sum()) if active.any() else 0.0
    recall = tp / int(y.sum()) if y.any() else 0.0
    return dict(f1=f1_score(active, y), precision=precision, recall=recall)


def best_single_latent_f1(fires_train, y_train, fires_test, y_test):
    """The one latent whose firing best predicts the letter: picked by F1 on the train words,
    its F1 on the test words. fires_*: (n, F) float, 1 where a latent fires (|a| > _EPS), made
    once per SAE rather than once per letter. Returns (latent, test F1)."""
    def f1s(fires, y):
        y = torch.as_tensor(np.asarray(y, bool)).float()
        return 2 * (y @ fires) / (fires.sum(0) + y.sum()).clamp(min=1)  # counts exact in float32 below 2^24 words

    best = int(f1s(fires_train, y_train).argmax())
    return best, float(f1s(fires_test[:, best:best + 1], y_test)[0])


def absorption_of_sae(sae, h, cfg, seed=None, scale=1.0, centre=None, main=None):
    """§2.3-8 for one SAE on the shared harvest h (run_absorption): main latents by the k-sparse
    probe on the latents divided by `scale` (or `main`, {letter: (main latents, [F1_k])}, as
    k_sparse_main_latents returned them), then per letter the words' full absorption and
    fraction, the main latents' F1 against the ground-truth labels on the test words, and the
    cosine with the probe of each fully absorbed word's top projector. SAEBench's figure is
    seed = eval_seed, scale = 1, centre = None. Returns {letter index: dict}."""
    f_train, f_test = encode(sae, h.x_train, cfg.sae_batch_tokens), encode(sae, h.x_test, cfg.sae_batch_tokens)
    if main is None:
        main = k_sparse_main_latents(f_train / scale, h.letters_train, f_test / scale, h.letters_test,
                                     h.evaluated, cfg.absorption_max_k, cfg.absorption_f1_jump,
                                     cfg.eval_seed if seed is None else seed)
    f_words = encode(sae, h.x_words, cfg.sae_batch_tokens)
    W_dec = sae.W_dec.detach().float().cpu()
    fires_train, fires_test = (f_train.abs() > _EPS).float(), (f_test.abs() > _EPS).float()
    per_letter = {}
    for c in h.evaluated:
        rows = h.letters_words == c
        full, fraction = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
        absorber_cos = []
        if rows.any():
            full, fraction = word_absorption(h.x_words[rows], f_words[rows], h.probe_w[c], W_dec, main[c][0],
                                             cfg.absorption_cos_full, cfg.absorption_cos_fraction,
                                             cfg.absorption_projection_share, cfg.absorption_max_absorbers,
                                             centre)
            cos = probe_cosines(W_dec, h.probe_w[c])
            top = (f_words[rows].double() * cos).argmax(1)
            absorber_cos = cos[top[full]].tolist()
        y_test = h.letters_test == c
        main_fires = (f_test[:, main[c][0]].abs() > _EPS).any(1).numpy() if main[c][0] else np.zeros(len(y_test), bool)
        best, best_f1 = best_single_latent_f1(fires_train, h.letters_train == c, fires_test, y_test)
        letter_words = [w for _, w, letter in h.words if letter == c]
        per_letter[c] = dict(f1_probe=h.f1_probe[c], n_tp=int(rows.sum()), n_full=int(full.sum()),
                             fraction_sum=float(fraction.sum()), n_main=len(main[c][0]),
                             main_latents=main[c][0], k_sparse_f1=main[c][1],
                             absorbed_words=[w for w, a in zip(letter_words, full) if a],
                             main_latents_vs_labels=latent_f1(main_fires, y_test),
                             best_single_latent=best, best_single_latent_f1=best_f1,
                             full=full.numpy(), fraction=fraction.numpy(), absorber_cos=absorber_cos)
    return per_letter


def absorption_replicates(per_letter, kept, cfg, key):
    """uncertainty() of a §2.9 mean over the kept letters, resampling words within letters."""
    arrays = [per_letter[c]["full" if key == "mean_full_absorption_score" else "fraction"] for c in kept]

    def statistic(draws):
        return float(np.mean([a[i].mean() for a, i in zip(arrays, draws)])) if arrays else float("nan")

    return uncertainty(statistic, [len(a) for a in arrays], cfg, "absorption", "words within letters")


def _absorption_summary(per_letter, cfg):
    """§2.9's figures of absorption_of_sae's per_letter, the kept letters and their bootstraps."""
    r = aggregate_absorption(per_letter, cfg.absorption_probe_f1_gate)
    r["one_minus_mean_full_absorption"] = 1 - r["mean_full_absorption_score"]
    kept = [_LETTERS.index(c) for c in r["letters_kept"]]
    u = {key: absorption_replicates(per_letter, kept, cfg, key)
         for key in ("mean_full_absorption_score", "mean_absorption_fraction_score")}
    flipped = [float(f"{1 - v:.6g}") for v in u["mean_full_absorption_score"]["replicates"]]
    u["one_minus_mean_full_absorption"] = dict(
        u["mean_full_absorption_score"], replicates=flipped,
        ci95=(None if u["mean_full_absorption_score"]["ci95"] is None
              else [1 - v for v in reversed(u["mean_full_absorption_score"]["ci95"])]))
    return r, kept, u


_ABSORPTION_KEYS = ("mean_full_absorption_score", "one_minus_mean_full_absorption", "mean_absorption_fraction_score")


def run_absorption(llm, saes, cfg):
    """§2 on every SAE, each beside its null (null_sae at the SAE's L0 on the train prompts' word
    positions), with a bootstrap over words within letters, diagnostics that say whether the
    latents find the letters at all, and a validity verdict (README: absorption)."""
    vocabulary = absorption_vocabulary(llm.tokenizer)
    rng = random.Random(cfg.eval_seed)
    if 0 < cfg.absorption_max_words < len(vocabulary):
        # A 262k vocabulary holds ~100k alphabetic tokens, millions of prompt tokens; a seeded
        # sample keeps the CPU default's cost in check (SAEBench takes them all)
        print(f"  absorption: a seeded sample of {cfg.absorption_max_words:,} of the {len(vocabulary):,} "
              "alphabetic tokens (absorption_max_words)")
        vocabulary = sorted(rng.sample(vocabulary, cfg.absorption_max_words))
    counts = np.bincount([c for _, _, c in vocabulary], minlength=len(_LETTERS))
    evaluated = [c for c in range(len(_LETTERS)) if counts[c] >= cfg.absorption_min_letter_tokens]
    skipped = [_LETTERS[c] for c in range(len(_LETTERS)) if c not in evaluated]
    print(f"  absorption vocabulary: {len(vocabulary)} alphabetic tokens; letters with fewer than "
          f"{cfg.absorption_min_letter_tokens} tokens skipped: {len(skipped)} ({''.join(skipped)})")
    shuffled = rng.sample(vocabulary, len(vocabulary))
    split = int(0.8 * len(shuffled))
    train, test = shuffled[:split], shuffled[split:]
    bos = llm.m.cfg.bos_token_id

    def harvest(entries, examples, name):
        rows, positions, keep = absorption_prompts(llm.tokenizer, bos, entries, [w for _, w, _ in examples],
                                                   cfg.absorption_icl_examples, rng)
        kept = [e for e, k in zip(entries, keep) if k]
        letters = np.array([c for _, _, c in kept], dtype=np.int64)
        return cached_residuals(llm, rows, name, positions), letters, kept

    # model level: the ground-truth letter probe on same-split ICL prompts (§2.2)
    x_train, letters_train, _ = harvest(train, train, "absorption-train")
    x_test, letters_test, test_kept = harvest(test, test, "absorption-test")
    dropped = len(vocabulary) - len(letters_train) - len(letters_test)
    probe_w, probe_b = letter_probe(x_train, letters_train, seed=cfg.eval_seed)
    test_logits = x_test @ probe_w.T + probe_b
    f1_probe = {c: f1_score((test_logits[:, c] > 0).numpy(), letters_test == c) for c in evaluated}
    # words evaluated: test tokens the probe gets right (§2.5), each in a fresh ICL prompt (§2.6)
    words = [e for e, row in zip(test_kept, test_logits) if e[2] in evaluated and row[e[2]] > 0]
    x_words, letters_words, words = harvest(words, vocabulary, "absorption-words")
    passing = sum(f1 > cfg.absorption_probe_f1_gate for f1 in f1_probe.values())
    print(f"  absorption: {len(letters_train)}/{len(letters_test)} train/test prompts "
          f"({dropped} dropped: word not one token in context), {len(letters_words)} probe "
          f"true positives, {passing} letters with probe F1 > {cfg.absorption_probe_f1_gate}")
    h = SimpleNamespace(x_train=x_train, letters_train=letters_train, x_test=x_test, letters_test=letters_test,
                        evaluated=evaluated, x_words=x_words, letters_words=letters_words, words=words,
                        probe_w=probe_w, f1_probe=f1_probe, nulls={})  # nulls: null_sae's shared dict
    results = []
    for i, sae in enumerate(saes):
        print(f"  absorption: SAE {i + 1}/{len(saes)}", flush=True)
        r = absorption_result(sae, h, cfg)
        r["letters_skipped_too_few_tokens"] = skipped
        r["prompts_dropped"] = dropped
        if r["n_letters_kept"] < cfg.absorption_min_letters:
            r["warning"] = (f"only {r['n_letters_kept']} letters pass the probe-F1 gate (SAEBench wants "
                            f"{cfg.absorption_min_letters}; it calls the eval meaningful for models "
                            f">= 1B with >= 16k latents)")
            print(f"  WARNING: absorption: {r['warning']}")
        if "null" in r:
            print(f"  absorption: mean full absorption {r['mean_full_absorption_score']:.3f} "
                  f"(null {r['null']['mean_full_absorption_score']:.3f}); "
                  f"{'testable' if r['validity']['testable'] else 'untestable: ' + '; '.join(r['validity']['reasons'])}")
        results.append(r)
    return results


def absorption_result(sae, h, cfg):
    """One SAE's §2 result on the harvest h: SAEBench's figures, their bootstrap, the null's,
    diagnostics, validity and (absorption_sensitivity) the sensitivity rows."""
    per_letter = absorption_of_sae(sae, h, cfg)
    r, kept, u = _absorption_summary(per_letter, cfg)
    r["uncertainty"] = u
    r["n_letters_kept"] = len(r["letters_kept"])
    if not r["letters_kept"]:
        r["null_reasons"] = {key: f"no letter's ground-truth probe reaches F1 > {cfg.absorption_probe_f1_gate}"
                             for key in _ABSORPTION_KEYS + ("mean_num_split_features",)}
    null, target = null_for(sae, h.x_train, cfg, h.nulls)
    if null is not None:
        null_r, _, r["null_uncertainty"] = _absorption_summary(absorption_of_sae(null, h, cfg), cfg)
        r["null"] = _null_record({key: null_r[key] for key in _ABSORPTION_KEYS}, target,
                                 "random unit decoder rows, encoder = decoder^T, threshold at the SAE's "
                                 "L0 on the absorption train prompts' word positions")
    margin = 2 / math.sqrt(h.x_train.shape[1])  # 2 σ of the cosine of two random directions in d dimensions
    r["diagnostics"] = _absorption_diagnostics(per_letter, kept, cfg, margin)
    r["validity"] = _absorption_validity(r, cfg)
    if cfg.absorption_sensitivity:
        r["sensitivity"], r["sensitivity_how"] = _absorption_sensitivity(sae, h, cfg, per_letter)
    r["per_letter"] = {_LETTERS[c]: {key: v for key, v in d.items() if key not in ("full", "fraction", "absorber_cos")}
                       for c, d in per_letter.items()}
    return r


def _absorption_diagnostics(per_letter, kept, cfg, margin):
    """Whether the latents find the letters at all (kept letters): the main latents' F1 /
    precision / recall against the ground-truth labels, the best single latent's F1, and the share
    of fully absorbed words whose top projector clears the cosine gate by `margin`."""
    cosines = [v for c in kept for v in per_letter[c]["absorber_cos"]]
    gate = cfg.absorption_cos_full + margin
    for c in per_letter:
        a = per_letter[c]["absorber_cos"]
        per_letter[c]["absorbers_clearing_gate"] = float(np.mean(np.asarray(a) >= gate)) if a else float("nan")

    def mean(get):
        return float(np.mean([get(per_letter[c]) for c in kept])) if kept else float("nan")

    return dict(main_latents_f1=mean(lambda v: v["main_latents_vs_labels"]["f1"]),
                main_latents_precision=mean(lambda v: v["main_latents_vs_labels"]["precision"]),
                main_latents_recall=mean(lambda v: v["main_latents_vs_labels"]["recall"]),
                best_single_latent_f1=mean(lambda v: v["best_single_latent_f1"]),
                absorbers_clearing_gate=float(np.mean(np.asarray(cosines) >= gate)) if cosines else float("nan"),
                absorber_gate=gate,
                how=(f"per kept letter on the test prompts, then averaged; absorbers: the top projector of each "
                     f"fully absorbed word, clearing cos >= absorption_cos_full + 2/sqrt(d) = {gate:.3f}"))


def _absorption_validity(r, cfg):
    """testable unless: the score is not clearly below its null (the 95% interval of the paired
    null − score lies above 0), the main latents' mean F1 against the letter labels is below
    absorption_min_main_f1, or fewer than absorption_min_letters letters pass the probe gate."""
    reasons = []
    key = "mean_full_absorption_score"
    if "null" not in r:
        reasons.append("no null (the SAE is silent on the prompts)")
    else:
        below = paired_interval(r["null_uncertainty"][key], r["uncertainty"][key])
        r["null_minus_score_ci95"] = below
        if below is None or not below[0] > 0:
            reasons.append(f"score not clearly below its null (null − score 95% interval {_interval(below)})")
    f1 = r["diagnostics"]["main_latents_f1"]
    if not f1 >= cfg.absorption_min_main_f1:
        reasons.append(f"main latents' F1 against the letter labels {f1:.2f} < {cfg.absorption_min_main_f1}")
    if r["n_letters_kept"] < cfg.absorption_min_letters:
        reasons.append(f"{r['n_letters_kept']} letters pass the probe gate (< {cfg.absorption_min_letters})")
    return dict(testable=not reasons, reasons=reasons)


def _interval(ci):
    return "none" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _absorption_sensitivity(sae, h, cfg, per_letter):
    """Mean full absorption under the choices that move it without any change in absorption
    (README: absorption), each a separate computation; SAEBench's figure stays the primary one.
    The centred projection keeps per_letter's main latents (SAEBench's figure's: the k-sparse
    probe does not see P); the other two refit the probe. Returns ({row: mean full absorption},
    one line saying how)."""
    f_train = encode(sae, h.x_train, cfg.sae_batch_tokens)
    active = f_train[f_train != 0]
    scale = float(active.abs().mean()) if len(active) else 1.0
    main = {c: (d["main_latents"], d["k_sparse_f1"]) for c, d in per_letter.items()}
    rows = dict(centred_projection=dict(centre=h.x_train.double().mean(0), main=main),
                scale_normalised_probe=dict(scale=scale),
                probe_seed_plus_1=dict(seed=cfg.eval_seed + 1))
    out = {}
    for name, kwargs in rows.items():
        r = aggregate_absorption(absorption_of_sae(sae, h, cfg, **kwargs), cfg.absorption_probe_f1_gate)
        out[name] = r["mean_full_absorption_score"]
    how = ("centred: P = (x − mean of the train prompts)·p; scale: latents / their mean non-zero "
           f"value on the train prompts ({scale:.4g}) in the k-sparse probe; seed: eval_seed + 1")
    return out, how


# -----------------------------------------------------------------------------
# §3 Sparse probing: top-k latents by mean difference + L2 logistic regression

def top_k_by_mean_difference(x, y, k):
    """Indices of the k columns with the largest |mean over positives − mean over negatives|."""
    y = torch.as_tensor(y).bool()
    difference = (x[y].double().mean(0) - x[~y].double().mean(0)).abs()
    return difference.argsort(descending=True)[:k]


def top_k_probe_correct(x_train, y_train, x_test, y_test, k):
    """§3.4: keep the top-k columns on train, fit L2 logistic regression (C=1; solved to
    convergence, where sklearn stops lbfgs at 1000 iterations) on the raw values; whether each
    test row is classified right at probability 0.5, (n_test,) bool."""
    chosen = top_k_by_mean_difference(x_train, y_train, k)
    w, b = logistic_regression(x_train[:, chosen], y_train, C=1.0)
    logits = torch.as_tensor(x_test[:, chosen], dtype=torch.float64) @ torch.as_tensor(w, dtype=torch.float64) + float(b)
    return ((logits > 0) == torch.as_tensor(y_test).bool()).numpy()


def dense_probe_accuracy(x_train, y_train, x_test, y_test, seed=0):
    """§3.5: SAEBench's full-width probe (AdamW lr 1e-2, BCE, batch 250, 100 epochs, patience 10),
    with the epoch picked by *test* accuracy: optimistic, reproduced for parity."""
    return train_probe_sgd(x_train, y_train, epochs=100, batch_size=250, lr=1e-2, weight_decay=0.01,
                           x_test=x_test, y_test=y_test, patience=10, seed=seed)[2]


def one_vs_rest(labels, cls, rng):
    """§3.2: all texts of `cls` as positives and as many negatives, drawn evenly from the other
    classes. Returns (indices, y) in shuffled order."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels == cls)
    others = sorted(set(labels.tolist()) - {cls})
    shares = [len(positives) // len(others) + (i < len(positives) % len(others)) for i in range(len(others))]
    negatives = [rng.choice(np.flatnonzero(labels == o), min(n, int(np.sum(labels == o))), replace=False)
                 for o, n in zip(others, shares)]
    indices = np.concatenate([positives] + negatives)
    y = np.concatenate([np.ones(len(positives), bool), np.zeros(len(indices) - len(positives), bool)])
    order = rng.permutation(len(indices))
    return torch.as_tensor(indices[order]), torch.as_tensor(y[order])


def select_class_texts(rows, classes, per_class, rng):
    """§3.1: up to per_class texts of each class, balanced over the attribute when the data has
    one (bias_in_bios: gender; amazon: rating). Returns (texts, labels)."""
    texts, labels = [], []
    for cls in classes:
        of_class = [r for r in rows if r["label"] == cls]
        if not of_class:
            found = sorted({r["label"] for r in rows})
            raise ValueError(f"class {cls!r} not in the data (labels found: {found[:30]})")
        groups = {}
        for r in of_class:
            groups.setdefault(r.get("attr"), []).append(r["text"])
        per_group = per_class // len(groups)
        for group in groups.values():
            picked = rng.choice(len(group), min(per_group, len(group)), replace=False)
            texts += [group[i] for i in sorted(picked)]
            labels += [cls] * len(picked)
    return texts, labels


def probing_data(llm, cfg, task, name):
    """Pooled residuals, per-token residuals (for SAE pooling) and one-vs-rest splits of a task,
    shared by sparse probing (§3) and TPP (§5)."""
    _, folder, classes = task
    rng = np.random.default_rng(cfg.eval_seed)
    data = {}
    for split, per_class in (("train", cfg.probing_train_per_class), ("test", cfg.probing_test_per_class)):
        texts, labels = select_class_texts(prepare.read_eval_rows(cfg.eval_data_dir, f"{folder}/{split}.jsonl"),
                                           classes, per_class, rng)
        rows = tokenize(llm.tokenizer, texts, llm.m.cfg.bos_token_id, cfg.probing_ctx)
        acts, counts = cached_residuals(llm, rows, f"{name}-{split}")
        data[split] = SimpleNamespace(acts=acts, counts=counts, pooled=mean_pool(acts, counts),
                                      labels=labels)
    splits = {c: (one_vs_rest(data["train"].labels, c, rng), one_vs_rest(data["test"].labels, c, rng))
              for c in classes}
    return data["train"], data["test"], splits


def probing_accuracies(x_train, x_test, splits, ks, seed=0, dense=True):
    """§3.4-6 on one feature matrix (pooled residual or pooled latents): mean over classes of the
    top-k accuracies and of the dense probe's accuracy (nan when dense=False), and per k and class
    whether each test row of that class's one-vs-rest split is classified right."""
    correct = {k: {} for k in ks}
    dense_accuracies = []
    for cls, ((train_idx, y_train), (test_idx, y_test)) in splits.items():
        for k in ks:
            correct[k][cls] = top_k_probe_correct(x_train[train_idx], y_train, x_test[test_idx], y_test,
                                                  min(k, x_train.shape[1]))
        if dense:
            dense_accuracies.append(dense_probe_accuracy(x_train[train_idx], y_train, x_test[test_idx], y_test, seed))
    top_k = {k: float(np.mean([v.mean() for v in by_class.values()])) for k, by_class in correct.items()}
    return top_k, float(np.mean(dense_accuracies)) if dense else float("nan"), correct


def probing_replicates(tasks, cfg, k):
    """uncertainty() of the top-k accuracy (mean over tasks of the class means), resampling test
    texts within their class: a text drawn m times counts m times in every split that holds it.
    tasks: [(test labels, splits, correct[k])]."""
    strata, offsets = [], []
    for labels, _, _ in tasks:
        labels = np.asarray(labels)
        offsets.append(len(strata))
        strata += [np.flatnonzero(labels == c) for c in sorted(set(labels.tolist()))]
    ends = offsets[1:] + [len(strata)]

    def statistic(draws):
        means = []
        for (labels, splits, correct), start, end in zip(tasks, offsets, ends):
            weight = np.zeros(len(labels))
            for positions, draw in zip(strata[start:end], draws[start:end]):
                np.add.at(weight, positions[draw], 1)
            accuracies = []
            for cls, (_, (test_idx, _)) in splits.items():
                w = weight[np.asarray(test_idx)]
                accuracies.append(float(w @ correct[k][cls] / w.sum()) if w.sum() else float("nan"))
            means.append(np.mean(accuracies))
        return float(np.mean(means))

    return uncertainty(statistic, [len(s) for s in strata], cfg, "sparse_probing", "test texts within classes")


def run_sparse_probing(llm, saes, cfg):
    """§3 on every SAE beside its null (null_sae at the SAE's L0 on the first task's train-text
    tokens), with a bootstrap over test texts and a validity verdict: testable when the top-1
    accuracy is clearly above its null (the paired 95% interval of score − null above 0). A
    binary task is scored on its first class's split only: SAEBench scores both, which (with as
    many texts in each class) hold the same texts with the labels swapped, so the top-k
    accuracies come out the same at twice the cost."""
    per_task = [dict() for _ in saes]
    boot = [dict(sae=[], null=[]) for _ in saes]
    nulls, shared = [None] * len(saes), {}
    for t, task in enumerate(cfg.probing_tasks):
        train, test, splits = probing_data(llm, cfg, task, task[0])
        if len(splits) == 2:  # §3.2: a binary task's two one-vs-rest splits are one split mirrored
            splits = dict(list(splits.items())[:1])
        print(f"  sparse probing {task[0]}: {len(train.labels)}/{len(test.labels)} train/test texts")
        llm_top_k, llm_dense, _ = probing_accuracies(train.pooled, test.pooled, splits, cfg.probing_ks,
                                                     cfg.eval_seed)
        for i, sae in enumerate(saes):
            print(f"  sparse probing {task[0]}: SAE {i + 1}/{len(saes)}", flush=True)
            f_train = mean_pool(train.acts, train.counts, sae, cfg.sae_batch_tokens)
            f_test = mean_pool(test.acts, test.counts, sae, cfg.sae_batch_tokens)
            sae_top_k, sae_dense, correct = probing_accuracies(f_train, f_test, splits, cfg.probing_ks, cfg.eval_seed)
            per_task[i][task[0]] = dict(
                llm_test_accuracy=llm_dense, sae_test_accuracy=sae_dense,
                **{f"llm_top_{k}_test_accuracy": v for k, v in llm_top_k.items()},
                **{f"sae_top_{k}_test_accuracy": v for k, v in sae_top_k.items()})
            boot[i]["sae"].append((test.labels, splits, correct))
            if t == 0:
                nulls[i] = null_for(sae, train.acts, cfg, shared)
        by_width = {}  # the nulls of one width are pooled together (mean_pool)
        for i, (null, _) in enumerate(nulls):
            if null is not None:
                by_width.setdefault(null.W_dec.shape[0], []).append(i)
        for members in by_width.values():
            group = [nulls[i][0] for i in members]
            pooled = zip(mean_pool(train.acts, train.counts, group, cfg.sae_batch_tokens),
                         mean_pool(test.acts, test.counts, group, cfg.sae_batch_tokens))
            for i, (null_train, null_test) in zip(members, pooled):
                null_top_k, _, null_correct = probing_accuracies(null_train, null_test, splits, cfg.probing_ks,
                                                                 dense=False)
                per_task[i][task[0]].update({f"null_top_{k}_test_accuracy": v for k, v in null_top_k.items()})
                boot[i]["null"].append((test.labels, splits, null_correct))
    results = []
    for tasks, b, (null, target) in zip(per_task, boot, nulls):  # unweighted mean over tasks of the class means (§3.6)
        keys = [key for key in next(iter(tasks.values())) if not key.startswith("null_")]
        r = {key: float(np.mean([t[key] for t in tasks.values()])) for key in keys}
        r["note"] = "llm/sae_test_accuracy pick the epoch by test accuracy (optimistic, as SAEBench)"
        r["uncertainty"] = {f"sae_top_{k}_test_accuracy": probing_replicates(b["sae"], cfg, k) for k in cfg.probing_ks}
        reasons = []
        if null is None:
            reasons.append("no null (the SAE is silent on the probing texts)")
        else:
            null_keys = [f"sae_top_{k}_test_accuracy" for k in cfg.probing_ks]
            r["null"] = _null_record({key: float(np.mean([t["null" + key[3:]] for t in tasks.values()])) for key in null_keys},
                                     target, "random unit decoder rows, encoder = decoder^T, threshold at the SAE's "
                                             "L0 on the first probing task's train-text tokens")
            r["null_uncertainty"] = {f"sae_top_{k}_test_accuracy": probing_replicates(b["null"], cfg, k)
                                     for k in cfg.probing_ks}
            first = f"sae_top_{cfg.probing_ks[0]}_test_accuracy"
            above = paired_interval(r["uncertainty"][first], r["null_uncertainty"][first])
            r["score_minus_null_ci95"] = above
            if above is None or not above[0] > 0:
                reasons.append(f"top-{cfg.probing_ks[0]} accuracy not clearly above its null "
                               f"(score − null 95% interval {_interval(above)})")
        r["validity"] = dict(testable=not reasons, reasons=reasons)
        r["per_task"] = tasks
        results.append(r)
    return results


# -----------------------------------------------------------------------------
# §4 SCR and §5 TPP: ablate the latents that matter to a probe, on pooled activations

def latent_effects(latents, y, probe_w, W_dec, clamp_positive=False):
    """§4.3 / §5.2: effect_f = d_f·(w·W_dec[f]), d_f = mean_pos(ā_f) − mean_neg(ā_f) of pooled
    latents over the probe's training texts; TPP clamps d_f ≥ 0."""
    y = torch.as_tensor(y).bool()
    d = latents[y].double().mean(0) - latents[~y].double().mean(0)
    if clamp_positive:
        d = d.clamp(min=0)
    return d * (W_dec.double() @ probe_w.double())


def top_n_latents(scores, n):
    """The n latents with the largest score among non-zero scores (all of them if fewer)."""
    k = min(n, int((scores != 0).sum()))
    return scores.topk(k).indices


def ablate(pooled_x, pooled_latents, W_dec, chosen):
    """§4.4: x' = x − Σ_{f∈S} a_f W_dec[f] at every valid position, the SAE error term kept.
    Mean pooling is linear, so pooling x' equals pooled x minus the pooled latents' decoding."""
    return pooled_x - pooled_latents[:, chosen].double() @ W_dec[chosen].double()


def saebench_ablation_latents(sae, latents, counts, ctx, batch_tokens=4096):
    """The pooled latents SAEBench's ablation effectively removes (ablation_positions="saebench").
    SAEBench pads every text to ctx positions, sets the BOS/EOS/pad rows to zero vectors and still
    encodes and decodes them when it ablates (scr_and_tpp/main.py, ablated_precomputed_activations:
    decode(f with S zeroed) + error at every row, summed, divided by the valid count). A zero row
    then adds −Σ_{f∈S} a_f(0)·W_dec[f]: the SAE's latents on the zero vector count ctx − n_valid
    times per text. Pooled latents (n_texts, F) plus that share of encode(0) give the same x'."""
    zero = encode(sae, torch.zeros(1, sae.W_dec.shape[1]), batch_tokens)[0].double()
    share = (ctx - counts).clamp(min=0).double() / counts.clamp(min=1).double()
    return (latents.double() + share[:, None] * zero).float()


def _ablation_latents(cfg, sae, latents, counts):
    """The test texts' pooled latents that ablate() subtracts, as ablation_positions asks."""
    if cfg.ablation_positions == "saebench":
        return saebench_ablation_latents(sae, latents, counts, cfg.probing_ctx, cfg.sae_batch_tokens)
    return latents


def train_scr_probe(x_train, y_train, x_test, y_test, batch_size=16, seed=0):
    """§4: Linear(d, 1), AdamW lr 1e-3, BCE + 1e-3·Σ|w|, 20 epochs, best test epoch (optimistic,
    as SAEBench). Returns (w, b)."""
    w, b, _ = train_probe_sgd(x_train, y_train, epochs=20, batch_size=batch_size, lr=1e-3,
                              weight_decay=0.01, l1=1e-3, x_test=x_test, y_test=y_test, seed=seed)
    return w, b


def scr_scores(probes, splits, x_test, latents_train, latents_test, W_dec, ns, min_denominator=1e-3,
               weights=None):
    """§4.3-5 for one (class pair × attribute) run. probes / splits are keyed "attribute",
    "class", "biased"; splits[name] = ((train indices, y), (test indices, y)) into the pooled
    train / test texts; x_test is the pooled test residual; weights (n_test,): a bootstrap's count
    of each test text (None: each once). Returns {N: dict(scr, dir1, dir2)}."""
    def acc(probe, x, split):
        idx, y = split
        return accuracy(*probe, x[idx], y, None if weights is None else weights[..., np.asarray(idx)])

    clean = {name: acc(probes[name], x_test, splits[name][1]) for name in ("attribute", "class")}
    biased_on = {name: acc(probes["biased"], x_test, splits[name][1]) for name in ("attribute", "class")}
    effects = {name: latent_effects(latents_train[splits[name][0][0]], splits[name][0][1],
                                    probes[name][0], W_dec).abs() for name in ("attribute", "class")}
    results = {}
    for n in ns:
        score = {}
        # direction 1 ablates the attribute probe's latents and measures the biased probe on the
        # class labels; direction 2 is the mirror image
        for direction, ablated, measured in ((1, "attribute", "class"), (2, "class", "attribute")):
            x_ablated = ablate(x_test, latents_test, W_dec, top_n_latents(effects[ablated], n))
            denominator = clean[measured] - biased_on[measured]
            changed = acc(probes["biased"], x_ablated, splits[measured][1])
            if weights is None or np.ndim(weights) == 1:
                score[direction] = ((changed - biased_on[measured]) / denominator
                                    if denominator >= min_denominator else 0.0)
            else:  # one score per bootstrap replicate
                usable = denominator >= min_denominator
                score[direction] = np.where(usable, (changed - biased_on[measured]) / np.where(usable, denominator, 1), 0.0)
        if np.ndim(score[1]) == 0:
            chosen = 1 if biased_on["class"] < biased_on["attribute"] else 2
            results[n] = dict(scr=score[chosen], dir1=score[1], dir2=score[2])
        else:
            results[n] = dict(scr=np.where(biased_on["class"] < biased_on["attribute"], score[1], score[2]),
                              dir1=score[1], dir2=score[2])
    return results


def scr_data(llm, cfg, run):
    """§4.1: the four cells (class × attribute) of one run, first rows in dataset order, and the
    attribute / class / biased probe splits (the biased probe sees only P1G1 vs P2G2)."""
    folder, p1, p2, g1, g2 = run
    rng = np.random.default_rng(cfg.eval_seed)
    pooled, acts, splits = {}, {}, {"attribute": [], "class": [], "biased": []}
    for split, q in (("train", cfg.scr_train_per_cell), ("test", cfg.scr_test_per_cell)):
        rows = prepare.read_eval_rows(cfg.eval_data_dir, f"{folder}/{split}.jsonl")
        cells = {(p, g): [r["text"] for r in rows if r["label"] == p and r.get("attr") == g]
                 for p in (p1, p2) for g in (g1, g2)}
        smallest = min(len(c) for c in cells.values())
        if smallest < 2:
            raise ValueError(f"SCR run {run}: {folder}/{split} has a cell with {smallest} texts "
                             f"(sizes {[len(c) for c in cells.values()]}); SCR needs labels and attrs")
        if 2 * q > smallest:
            print(f"  note: SCR {p1}/{p2} {split}: {smallest // 2} texts per cell instead of {q} "
                  f"(the smallest cell has {smallest})")
            q = smallest // 2
        texts, start = [], {}
        for key, cell in cells.items():  # 2q per cell: the biased probe takes 2q of two cells
            start[key] = len(texts)
            texts += cell[:2 * q]
        rows = tokenize(llm.tokenizer, texts, llm.m.cfg.bos_token_id, cfg.probing_ctx)
        acts[split] = cached_residuals(llm, rows, f"scr-{folder}-{p1}-{p2}-{split}")
        pooled[split] = mean_pool(*acts[split])

        def take(positive, negative, n):
            idx = np.concatenate([np.arange(start[k], start[k] + n) for k in positive + negative])
            y = np.arange(len(idx)) < n * len(positive)
            order = rng.permutation(len(idx))
            return torch.as_tensor(idx[order]), torch.as_tensor(y[order])

        splits["attribute"].append(take([(p1, g1), (p2, g1)], [(p1, g2), (p2, g2)], q))
        splits["class"].append(take([(p1, g1), (p1, g2)], [(p2, g1), (p2, g2)], q))
        splits["biased"].append(take([(p1, g1)], [(p2, g2)], 2 * q))
    return acts, pooled, splits


def _float_or_array(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v)


def ablation_replicates(args, score, cfg, metric, unit):
    """uncertainty() of SCR's / TPP's headline (mean over runs or tasks at N = headline_n),
    resampling test texts within their cells / classes. args[j] = (score's arguments for run j
    up to W_dec, its strata: arrays of positions into its pooled test texts). The ablations do
    not depend on the draw, so score() runs once per run on all replicates' text counts at once
    (weights (n_boot, n_test)); the draws are bootstrap()'s, so replicate b pairs across SAEs."""
    flat = [(j, positions) for j, (*_, strata) in enumerate(args) for positions in strata]
    sizes = [len(p) for _, p in flat]
    weights = [[] for _ in args]

    def collect(draws):
        counts = [np.zeros(len(a[2])) for a in args]  # a[2]: the pooled test texts
        for (j, positions), draw in zip(flat, draws):
            np.add.at(counts[j], positions[draw], 1)
        for j, c in enumerate(counts):
            weights[j].append(c)
        return 0.0

    bootstrap(collect, sizes, cfg.bootstrap_samples, bootstrap_seed(cfg, metric))
    values = iter(np.mean([score(*a[:-1], [cfg.headline_n], weights=np.array(w))[cfg.headline_n][metric]
                           for a, w in zip(args, weights)], axis=0))
    return uncertainty(lambda draws: float(next(values)), sizes, cfg, metric, unit)


def run_scr(llm, saes, cfg):
    per_run = [dict() for _ in saes]
    boot = [[] for _ in saes]
    texts_per_cell = {}
    for run in cfg.scr_runs:
        name = f"{run[0]}:{run[1]}/{run[2]}"
        acts, pooled, splits = scr_data(llm, cfg, run)
        texts_per_cell[name] = len(splits["class"][1][0]) // 4  # the class probe's test split: 4 cells
        probes = {key: train_scr_probe(pooled["train"][tr[0]], tr[1], pooled["test"][te[0]], te[1],
                                       cfg.scr_probe_batch, cfg.eval_seed)
                  for key, (tr, te) in splits.items()}
        for i, sae in enumerate(saes):
            latents = {s: mean_pool(*acts[s], sae, cfg.sae_batch_tokens) for s in ("train", "test")}
            ablated = _ablation_latents(cfg, sae, latents["test"], acts["test"][1])
            args = (probes, splits, pooled["test"], latents["train"], ablated, sae.W_dec.detach().float().cpu())
            per_run[i][name] = scr_scores(*args, cfg.ablation_ns)
            m = len(pooled["test"]) // 4  # the test texts: 4 cells of 2q in a row
            boot[i].append(args + ([np.arange(c * m, (c + 1) * m) for c in range(4)],))
        print(f"  SCR {name}: done")
    results = []
    for runs, args in zip(per_run, boot):
        r = {f"scr_metric_n{n}": float(np.mean([v[n]["scr"] for v in runs.values()]))
             for n in cfg.ablation_ns}
        r["scr_metric"] = r.get(f"scr_metric_n{cfg.headline_n}", float("nan"))
        r["headline_n"] = cfg.headline_n
        r["ablation_positions"] = _ABLATION_LABELS[cfg.ablation_positions]
        r["test_texts_per_cell"] = texts_per_cell
        r["note"] = "probes keep their best *test* epoch (optimistic, as SAEBench)"
        r["note_directions"] = ("dir1 / dir2 = (biased probe's accuracy after the ablation - before) / "
                                "(clean - biased probe's accuracy) on the measured labels: an unbounded "
                                "ratio, large where that gap is small (under 1e-3 it scores 0); scr_metric "
                                "takes the direction whose biased accuracy is lower, as SAEBench does")
        r["per_run"] = {name: {str(n): v for n, v in scores.items()} for name, scores in runs.items()}
        r["uncertainty"] = {"scr_metric": ablation_replicates(args, scr_scores, cfg, "scr",
                                                              "test texts within (class, attribute) cells")}
        results.append(r)
    return results


def tpp_scores(probes, splits, x_test, latents_train, latents_test, W_dec, ns, weights=None):
    """§5.2-4 for one dataset. probes[c] = (w, b); splits[c] = ((train idx, y), (test idx, y)).
    Each class's latents (effects with d_f ≥ 0, no absolute value) are ablated on all test texts
    and every probe is re-tested on its own test split; weights as scr_scores'.
    Returns {N: dict(tpp, intended, unintended)}."""
    def acc(c, x):
        idx, y = splits[c][1]
        return accuracy(*probes[c], x[idx], y, None if weights is None else weights[..., np.asarray(idx)])

    classes = list(probes)
    clean = {c: acc(c, x_test) for c in classes}
    results = {}
    for n in ns:
        intended, unintended = [], []
        for i in classes:
            (train_idx, y), _ = splits[i]
            effects = latent_effects(latents_train[train_idx], y, probes[i][0], W_dec, clamp_positive=True)
            x_ablated = ablate(x_test, latents_test, W_dec, top_n_latents(effects, n))
            ablated = {j: acc(j, x_ablated) for j in classes}
            intended.append(clean[i] - ablated[i])
            unintended.append(np.mean([clean[j] - ablated[j] for j in classes if j != i], axis=0))
        intended, unintended = np.mean(intended, axis=0), np.mean(unintended, axis=0)  # per replicate with 2-D weights
        results[n] = dict(tpp=_float_or_array(intended - unintended), intended=_float_or_array(intended),
                          unintended=_float_or_array(unintended))
    return results


def run_tpp(llm, saes, cfg):
    per_task = [dict() for _ in saes]
    boot = [[] for _ in saes]
    texts_per_class = {}
    for task in cfg.tpp_tasks:
        train, test, splits = probing_data(llm, cfg, task, task[0])
        texts_per_class[task[0]] = min(test.labels.count(c) for c in task[2])
        # SAEBench re-samples each probe's negatives at every re-test; ours are fixed per class,
        # so clean and ablated accuracies compare the same texts (same expectation, less noise)
        probes = {c: train_scr_probe(train.pooled[tr[0]], tr[1], test.pooled[te[0]], te[1],
                                     cfg.scr_probe_batch, cfg.eval_seed) for c, (tr, te) in splits.items()}
        for i, sae in enumerate(saes):
            latents_train = mean_pool(train.acts, train.counts, sae, cfg.sae_batch_tokens)
            latents_test = mean_pool(test.acts, test.counts, sae, cfg.sae_batch_tokens)
            latents_test = _ablation_latents(cfg, sae, latents_test, test.counts)
            args = (probes, splits, test.pooled, latents_train, latents_test, sae.W_dec.detach().float().cpu())
            per_task[i][task[0]] = tpp_scores(*args, cfg.ablation_ns)
            labels = np.asarray(test.labels)
            boot[i].append(args + ([np.flatnonzero(labels == c) for c in sorted(set(test.labels))],))
        print(f"  TPP {task[0]}: done")
    results = []
    for tasks, args in zip(per_task, boot):
        r = {}
        for n in cfg.ablation_ns:
            for key in ("tpp", "intended", "unintended"):
                r[f"{key}_n{n}"] = float(np.mean([t[n][key] for t in tasks.values()]))
        r["tpp_metric"] = r.get(f"tpp_n{cfg.headline_n}", float("nan"))
        r["headline_n"] = cfg.headline_n
        r["ablation_positions"] = _ABLATION_LABELS[cfg.ablation_positions]
        r["test_texts_per_class"] = texts_per_class  # the fewest of any class
        r["note"] = "probes keep their best *test* epoch (optimistic, as SAEBench)"
        r["per_task"] = {name: {str(n): v for n, v in scores.items()} for name, scores in tasks.items()}
        r["uncertainty"] = {"tpp_metric": ablation_replicates(args, tpp_scores, cfg, "tpp",
                                                              "test texts within classes")}
        results.append(r)
    return results


# -----------------------------------------------------------------------------
# §6 OOD probing: dense L2 "oracle" probe vs L1 probe on the top-k SAE latents, AUC

def encode_labels(labels):
    """§6.2: sorted-order codes per file, as sklearn's LabelEncoder (numbers sort as numbers)."""
    try:
        classes = sorted(set(labels), key=float)
    except ValueError:
        classes = sorted(set(labels))
    code = {c: i for i, c in enumerate(classes)}
    return np.array([code[v] for v in labels]), classes


def stratified_folds(y, n_folds=6, seed=42):
    """The validation folds of sklearn's StratifiedKFold(n_folds, shuffle=True, random_state=seed),
    which SAE-Probes' get_cv uses (utils_training.py: random_state 42 in the repository's OOD run,
    the sae-probes package's seed, 42 from run_sae_eval), so the C it picks is ours too. sklearn numbers the classes in order of first appearance, deals the sorted
    class codes to the folds in turn (fold i's share of each class), and shuffles each class's list
    of fold numbers with one RandomState(seed), class after class (model_selection/_split.py,
    StratifiedKFold._make_test_folds)."""
    _, first, codes = np.unique(np.asarray(y), return_index=True, return_inverse=True)
    encoded = np.argsort(np.argsort(first))[codes]  # class codes by order of first appearance
    dealt = np.sort(encoded)
    share = np.array([np.bincount(dealt[i::n_folds], minlength=len(first)) for i in range(n_folds)])
    rng = np.random.RandomState(seed)
    fold_of = np.empty(len(encoded), dtype=np.int64)
    for c in range(len(first)):
        folds_of_class = np.repeat(np.arange(n_folds), share[:, c])
        rng.shuffle(folds_of_class)
        fold_of[encoded == c] = folds_of_class
    return [np.flatnonzero(fold_of == i) for i in range(n_folds)]


def validation_splits(y, seed=42):
    """§6.5 validation for find_best_reg, as SAE-Probes' get_cv / get_splits: n ≥ 128 holds out
    the last min(20%, 100) rows; 12 < n < 128 uses sklearn's 6-fold stratified CV (shuffled,
    seed 42); smaller n leaves two out. Folds whose validation part lacks a class are dropped."""
    y = np.asarray(y)
    n = len(y)
    if n >= 128:
        n_val = min(int(0.2 * n), 100)
        return [(np.arange(n - n_val), np.arange(n - n_val, n))]
    everything = np.arange(n)
    if n > 12:
        folds = stratified_folds(y, 6, seed)
    else:
        folds = [np.array([i, j]) for i in range(n) for j in range(i + 1, n)]
    return [(np.setdiff1d(everything, fold), fold) for fold in folds if len(np.unique(y[fold])) == 2]


def find_best_reg(x, y, penalty="l2", grid=tuple(np.logspace(5, -5, 10))):
    """§6.5: the C of `grid` with the best mean validation AUC (the first of those within 1e-12
    of it), refitted on all rows; C = 1 when there are too few rows to validate (n ≤ 3).
    Returns (w, b, C)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), np.asarray(y)
    best = 1.0
    if len(y) > 3:
        folds = validation_splits(y)
        aucs = []  # (folds, grid)
        for train_idx, val_idx in folds:
            if len(np.unique(y[train_idx])) < 2:  # SAE-Probes scores a one-class fit 0.5
                aucs.append([0.5] * len(grid))
                continue
            w, b = logistic_regression(x[train_idx], y[train_idx], C=list(grid), penalty=penalty)
            logits = (x[val_idx] @ w + b).numpy()
            aucs.append([roc_auc(logits[:, j], y[val_idx]) for j in range(len(grid))])
        aucs = np.asarray(aucs).reshape(-1, len(grid))
        scores = [np.mean(a) if len(a) and not np.isnan(a).any() else -1.0 for a in aucs.T]
        # SAE-Probes' argmax takes the first of exactly equal AUCs; a sum in another order can
        # differ by an ulp, so equal up to 1e-12 counts as a tie here
        best = grid[int(np.flatnonzero(np.asarray(scores) >= max(scores) - 1e-12)[0])]
    w, b = logistic_regression(x, y, C=best, penalty=penalty)
    return w, b, float(best)


def ood_oracle_scores(x_id, y_id, x_ood, pool_rows=1500, per_class=512, seed=42):
    """§6.3: a balanced random draw of per_class rows per class from the first pool_rows ID rows,
    dense L2 probe with C by find_best_reg; returns (its logits on the OOD rows, C)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(y_id[:pool_rows])
    n = min(per_class, *(int(np.sum(pool == c)) for c in (0, 1)))
    rows = np.concatenate([rng.choice(np.flatnonzero(pool == c), n, replace=False) for c in (0, 1)])
    rows = rows[rng.permutation(len(rows))]
    w, b, C = find_best_reg(x_id[rows], pool[rows], "l2")
    return (torch.as_tensor(x_ood, dtype=torch.float64) @ w + b).numpy(), C


def ood_sae_scores(f_id, y_id, f_ood, k, pool_rows=1500, per_class=512):
    """§6.4: the first per_class positives and negatives among the first pool_rows ID rows (in
    file order), top-k latents by mean difference, L1 probe with C by find_best_reg; returns (its
    logits on the OOD rows, C)."""
    pool = np.asarray(y_id[:pool_rows])
    rows = np.sort(np.concatenate([np.flatnonzero(pool == c)[:per_class] for c in (0, 1)]))
    chosen = top_k_by_mean_difference(f_id[rows], pool[rows], min(k, f_id.shape[1]))
    w, b, C = find_best_reg(f_id[rows][:, chosen], pool[rows], "l1")
    return (f_ood[:, chosen].double() @ w + b).numpy(), C


def resampled_auc(scores, y):
    """A function rows -> roc_auc(scores[rows], y[rows]) for the many row draws of a bootstrap: the
    tie groups are found once, and each draw's AUC is the Mann-Whitney count of negatives below
    each positive (ties half), by bincount instead of a sort."""
    _, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    group, y = group.ravel(), np.asarray(y).astype(bool)
    n_groups = int(group.max()) + 1 if len(group) else 0

    def auc(rows):
        g, positive = group[rows], y[rows]
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        negatives = np.bincount(g[~positive], minlength=n_groups)
        below = np.cumsum(negatives) - negatives
        return float((below[g[positive]] + 0.5 * negatives[g[positive]]).sum() / (n_pos * n_neg))

    return auc


def ood_replicates(tasks, cfg, key, memo=None, owner=""):
    """uncertainty() of a mean over datasets of AUCs (key "oracle", "k<k>") or of the gap
    oracle − SAE ("gap_k<k>"), resampling OOD rows within their class. tasks: [(y_ood, scores)],
    scores[name] the logits on the OOD rows. memo: {(owner, dataset, name, b): AUC} shared by
    calls on the same datasets (replicate b is the same draw in each), so the oracle's AUCs (owner
    "oracle") and each probe's (owner: whose latents) are computed once for every key and SAE."""
    strata = [np.flatnonzero(np.asarray(y) == c) for y, _ in tasks for c in (0, 1)]
    names = ["oracle", key[4:]] if key.startswith("gap_") else [key]
    aucs = [{name: resampled_auc(scores[name], y) for name in names} for y, scores in tasks]
    memo = {} if memo is None else memo
    replicate = iter(range(cfg.bootstrap_samples))

    def statistic(draws):
        b, values = next(replicate), []
        for t, auc in enumerate(aucs):
            rows = np.concatenate([strata[2 * t][draws[2 * t]], strata[2 * t + 1][draws[2 * t + 1]]])
            got = {}
            for name in names:
                slot = ("oracle" if name == "oracle" else owner, t, name, b)
                if slot not in memo:
                    memo[slot] = auc[name](rows)
                got[name] = memo[slot]
            values.append(got["oracle"] - got[names[1]] if len(names) == 2 else got[key])
        return float(np.mean(values))

    return uncertainty(statistic, [len(s) for s in strata], cfg, "ood", "OOD rows within classes")


_OOD_CHANCE = 0.55  # an oracle whose AUC interval reaches this is near chance: nothing to transfer


def run_ood(llm, saes, cfg):
    """§6 on every SAE beside its null (null_sae at the SAE's L0 on the ID rows' last tokens),
    with a bootstrap over OOD rows; a dataset whose oracle AUC interval reaches _OOD_CHANCE is
    flagged near chance, and the metric is untestable when its mean oracle's interval does."""
    max_len = min(cfg.ood_max_tokens, llm.max_positions)
    data = {}
    for name, id_file, ood_file in cfg.ood_tasks:
        for part, file in (("id", id_file), ("ood", ood_file)):
            rows = prepare.read_eval_rows(cfg.eval_data_dir, file)
            y, classes = encode_labels([r["label"] for r in rows])  # codes of the whole file (§6.2)
            if part == "id":  # both probes train on the first ood_pool_rows rows only
                rows, y = rows[:cfg.ood_pool_rows], y[:cfg.ood_pool_rows]
            if len(classes) != 2:
                raise ValueError(f"{file}: OOD probing is binary, found labels {classes[:10]}")
            texts = [r["text"] for r in rows]
            tokens = tokenize(llm.tokenizer, texts, llm.m.cfg.bos_token_id, max_len, keep="end")
            x = cached_residuals(llm, tokens, f"ood-{name}-{part}", [len(t) - 1 for t in tokens])
            data[name, part] = (x, y)
    oracles = {}
    for name, _, _ in cfg.ood_tasks:
        (x_id, y_id), (x_ood, y_ood) = data[name, "id"], data[name, "ood"]
        scores, C = ood_oracle_scores(x_id, y_id, x_ood, cfg.ood_pool_rows, cfg.ood_train_per_class, cfg.eval_seed)
        oracles[name] = (scores, C, roc_auc(scores, y_ood))
        print(f"  OOD {name}: {len(y_id)} ID (training pool) / {len(y_ood)} OOD rows, oracle AUC {oracles[name][2]:.3f}")
    x_clean = torch.cat([data[name, "id"][0] for name, _, _ in cfg.ood_tasks])
    results, memo, shared = [], {}, {}  # the oracle's bootstrap AUCs and null_sae's directions, shared by every SAE
    t0 = time.time()
    for i, sae in enumerate(saes):
        print(f"  OOD: SAE {i + 1}/{len(saes)} ({time.time() - t0:.0f} s)", flush=True)
        null, target = null_for(sae, x_clean, cfg, shared)
        per_task, boot, null_boot = {}, [], []
        for name, _, _ in cfg.ood_tasks:
            (x_id, y_id), (x_ood, y_ood) = data[name, "id"], data[name, "ood"]
            oracle_scores, oracle_C, oracle = oracles[name]
            entry = dict(oracle_auc=oracle, oracle_C=oracle_C)
            scores, null_scores = dict(oracle=oracle_scores), dict(oracle=oracle_scores)
            for which, s in (("sae", sae), ("null", null)):
                if s is None:
                    continue
                f_id, f_ood = encode(s, x_id, cfg.sae_batch_tokens), encode(s, x_ood, cfg.sae_batch_tokens)
                for k in cfg.ood_ks:
                    logits, C = ood_sae_scores(f_id, y_id, f_ood, k, cfg.ood_pool_rows, cfg.ood_train_per_class)
                    (scores if which == "sae" else null_scores)[f"k{k}"] = logits
                    entry[f"{which}_auc_k{k}"] = roc_auc(logits, y_ood)
                    if which == "sae":
                        entry[f"sae_C_k{k}"] = C
            per_task[name] = entry
            boot.append((y_ood, scores))
            null_boot.append((y_ood, null_scores))
        results.append(_ood_result(per_task, boot, null_boot, null, target, cfg, memo))
    return results


def _ood_result(per_task, boot, null_boot, null, target, cfg, memo=None):
    oracle = float(np.mean([t["oracle_auc"] for t in per_task.values()]))
    r = dict(oracle_auc=oracle)
    for k in cfg.ood_ks:
        sae_auc = float(np.mean([t[f"sae_auc_k{k}"] for t in per_task.values()]))
        r[f"sae_auc_k{k}"] = sae_auc
        r[f"gap_k{k}"] = oracle - sae_auc                  # absolute AUC points (§6.6)
        r[f"relative_gap_k{k}"] = (oracle - sae_auc) / oracle
    keys = ["oracle"] + [f"{p}k{k}" for k in cfg.ood_ks for p in ("", "gap_")]
    names = {key: "oracle_auc" if key == "oracle" else key if key.startswith("gap_") else f"sae_auc_{key}"
             for key in keys}
    memo = {} if memo is None else memo
    for slot in [slot for slot in memo if slot[0] != "oracle"]:  # the previous SAE's: start afresh
        del memo[slot]
    r["uncertainty"] = {names[key]: ood_replicates(boot, cfg, key, memo, "sae") for key in keys}
    if null is not None:
        values = {}
        for k in cfg.ood_ks:
            values[f"sae_auc_k{k}"] = float(np.mean([t[f"null_auc_k{k}"] for t in per_task.values()]))
            values[f"gap_k{k}"] = oracle - values[f"sae_auc_k{k}"]
        r["null"] = _null_record(values, target, "random unit decoder rows, encoder = decoder^T, threshold at "
                                                 "the SAE's L0 on the ID rows' last tokens (every dataset)")
        r["null_uncertainty"] = {names[key]: ood_replicates(null_boot, cfg, key, memo, "null")
                                 for key in keys if key != "oracle"}
    # the oracle's interval per dataset: its scores do not depend on the SAE, nor do the draws
    flagged = []
    for t, (name, entry) in enumerate(per_task.items()):
        u = ood_replicates([boot[t]], cfg, "oracle")
        entry["oracle_auc_ci95"] = u["ci95"]
        entry["oracle_near_chance"] = u["ci95"] is None or u["ci95"][0] <= _OOD_CHANCE
        if entry["oracle_near_chance"]:
            flagged.append(name)
    reasons = []
    if flagged:
        reasons.append(f"oracle near chance (95% interval reaches AUC {_OOD_CHANCE}) on {len(flagged)} of "
                       f"{len(per_task)} datasets: {', '.join(flagged)}")
    ci = r["uncertainty"]["oracle_auc"]["ci95"]
    r["validity"] = dict(testable=ci is not None and ci[0] > _OOD_CHANCE, reasons=reasons,
                         datasets_near_chance=flagged,
                         rule=f"untestable when the mean oracle AUC's 95% interval reaches {_OOD_CHANCE}; "
                              "datasets whose own interval does are flagged")
    if not r["validity"]["testable"]:
        reasons.insert(0, f"mean oracle AUC near chance (95% interval {_interval(ci)})")
    r["per_task"] = per_task
    return r


# -----------------------------------------------------------------------------
# SAEBench result files: each metric's eval.json entry in sae-bench 0.6.0's output schema
# (sae_bench/evals/base_eval_output.py and <eval>/eval_output.py), so SAEBench's graphing code
# and UIs read our numbers. A number SAEBench has a slot for goes there under SAEBench's name;
# every other key of our entry (per-task tables, nulls and their reasons, intervals, validity
# flags, whatever a metric adds later) passes through to eval_result_unstructured unchanged.
# OOD has no file: SAEBench's sae-probes eval aggregates only the "normal" setting, not OOD.

_SAEBENCH_VERSION = "0.6.0"
_SAEBENCH_TYPES = {"core": "core", "absorption": "absorption_first_letter",
                   "sparse_probing": "sparse_probing", "scr": "scr", "tpp": "tpp"}
_SAEBENCH_KS = [1, 2, 5, 10, 20, 50, 100]          # sparse probing's top-k slots
_SAEBENCH_NS = [2, 5, 10, 20, 50, 100, 500]         # SCR / TPP's threshold slots
_SAEBENCH_CORE = {  # category: {SAEBench metric: our key}; None = a number we do not compute
    "model_behavior_preservation": dict(kl_div_score="kl_div_score", kl_div_with_ablation="kl_div_with_ablation",
                                        kl_div_with_sae="kl_div_with_sae"),
    "model_performance_preservation": dict(ce_loss_score="ce_loss_score", ce_loss_with_ablation="ce_loss_with_ablation",
                                           ce_loss_with_sae="ce_loss_with_sae", ce_loss_without_sae="ce_loss_without_sae"),
    "reconstruction_quality": dict(explained_variance="explained_variance_saebench_current",  # §1.5
                                   explained_variance_legacy="explained_variance_legacy", mse="mse_saebench",
                                   cossim="cossim"),
    "shrinkage": dict(l2_norm_in="l2_norm_in", l2_norm_out="l2_norm_out", l2_ratio="l2_ratio",
                      relative_reconstruction_bias="relative_reconstruction_bias"),
    "sparsity": dict(l0="l0", l1="l1"),
    "token_stats": dict(total_tokens_eval_reconstruction="ce_tokens", total_tokens_eval_sparsity_variance="tokens"),
    "misc_metrics": dict(freq_over_1_percent="frac_dense_above_1pct", freq_over_10_percent="frac_dense_above_10pct",
                         normalized_freq_over_1_percent=None, normalized_freq_over_10_percent=None,
                         average_max_encoder_cosine_sim=None, average_max_decoder_cosine_sim=None,
                         frac_alive="frac_alive"),
}


def _saebench_config(metric, s, model_name):
    """eval_config under SAEBench's field names, from our settings s (absent settings left out)."""
    def pick(**fields):
        return {name: s[ours] if isinstance(ours, str) else ours(s) for name, ours in fields.items()
                if not isinstance(ours, str) or ours in s}
    common = dict(model_name=model_name, **pick(llm_dtype="llm_dtype"))
    if metric == "core":
        return {**common, "exclude_special_tokens_from_reconstruction": True, "compute_kl": True,
                "compute_ce_loss": True, "compute_l2_norms": True, "compute_sparsity_metrics": True,
                "compute_variance_metrics": True, **pick(batch_size_prompts="core_batch_rows",
                                                         dataset="core_dataset", context_size="core_ctx")}
    if metric == "absorption":
        return {**common, **pick(random_seed="eval_seed", f1_jump_threshold="absorption_f1_jump",
                                 max_k_value="absorption_max_k", min_GT_probe_f1="absorption_probe_f1_gate"),
                "prompt_template": "{word}" + _PROMPT_SUFFIX}
    tasks = "scr_runs" if metric == "scr" else "tpp_tasks" if metric == "tpp" else "probing_tasks"
    config = {**common, **pick(random_seed="eval_seed", context_length="probing_ctx",
                               dataset_names=lambda s: [t[0] for t in s.get(tasks, [])])}
    if metric == "sparse_probing":
        return {**config, **pick(k_values="probing_ks")}
    return {**config, "perform_scr": metric == "scr", **pick(n_values="ablation_ns")}


def _saebench_metrics(metric, r):
    """(eval_result_metrics, eval_result_details, {slot: why it is NaN}, our keys used) of one
    metric entry r. A required slot without a number is NaN, as SAEBench itself writes one."""
    used, nan = set(), {}

    def take(key, slot, required=False):
        value = r.get(key) if key else None
        if key in r:
            used.add(key)
        if value is None and required:
            nan[slot] = (r.get("null_reasons", {}).get(key, f"null in eval.json ({key})") if key in r
                         else "not computed by evaluate.py")
            return float("nan")
        return value

    details = []
    if metric == "core":
        metrics = {cat: {slot: take(key, slot, required=True) for slot, key in slots.items()}
                   for cat, slots in _SAEBENCH_CORE.items()}
        density = np.asarray(r.get("latent_density") or [], dtype=np.float64)
        if density.sum() > 0:  # SAEBench: the density share of latents denser than 1% / 10%
            for pct in (1, 10):
                metrics["misc_metrics"][f"normalized_freq_over_{pct}_percent"] = float(
                    density[density > pct / 100].sum() / density.sum())
                nan.pop(f"normalized_freq_over_{pct}_percent")
        metrics["token_stats"] = {slot: None if take(key, slot) is None else int(r[key])  # ints in SAEBench
                                  for slot, key in _SAEBENCH_CORE["token_stats"].items()}
    elif metric == "absorption":
        per_letter = r.get("per_letter", {})
        kept = [c for c in r.get("letters_kept", []) if per_letter.get(c, {}).get("n_tp")]
        rows = {c: dict(first_letter=c, mean_absorption_fraction=per_letter[c]["fraction_sum"] / per_letter[c]["n_tp"],
                        full_absorption_rate=per_letter[c]["n_full"] / per_letter[c]["n_tp"],
                        num_full_absorption=per_letter[c]["n_full"], num_probe_true_positives=per_letter[c]["n_tp"],
                        num_split_features=per_letter[c]["n_main"]) for c in kept}
        details = list(rows.values())
        mean = {slot: take(slot, slot, required=True) for slot in
                ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")}
        for slot, field in (("std_dev_absorption_fraction_score", "mean_absorption_fraction"),
                            ("std_dev_full_absorption_score", "full_absorption_rate"),
                            ("std_dev_num_split_features", "num_split_features")):
            values = [row[field] for row in details]  # SAEBench: statistics.stdev over kept letters
            mean[slot] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            if len(values) < 2:
                nan[slot] = f"{len(values)} letter(s) pass the probe-F1 gate: no standard deviation"
        metrics = {"mean": mean}
    elif metric == "sparse_probing":
        names = ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in _SAEBENCH_KS]
        metrics = {side: {f"{side}_{n}": take(f"{side}_{n}", f"{side}_{n}", required=(side, n) == ("llm", "test_accuracy"))
                          for n in names} for side in ("llm", "sae")}
        details = [dict(dataset_name=task, **{f"{side}_{n}": t.get(f"{side}_{n}") for side in ("llm", "sae") for n in names})
                   for task, t in r.get("per_task", {}).items()]
        for d in details:  # the one detail SAEBench requires
            if d["llm_test_accuracy"] is None:
                d["llm_test_accuracy"] = float("nan")
                nan[f"{d['dataset_name']}: llm_test_accuracy"] = "null in eval.json (llm_test_accuracy)"
    elif metric == "scr":
        per_run = r.get("per_run", {})
        def mean_over_runs(n, field):
            values = [v[str(n)][field] for v in per_run.values() if str(n) in v and v[str(n)][field] is not None]
            return float(np.mean(values)) if values else None
        scr = {}
        for n in _SAEBENCH_NS:
            scr[f"scr_dir1_threshold_{n}"] = mean_over_runs(n, "dir1")
            scr[f"scr_metric_threshold_{n}"] = take(f"scr_metric_n{n}", None)
            scr[f"scr_dir2_threshold_{n}"] = mean_over_runs(n, "dir2")
        metrics = {"scr_metrics": scr}
        details = [dict(dataset_name=name, **{f"scr_{slot}_threshold_{n}": v[str(n)][field]
                                              for n in _SAEBENCH_NS if str(n) in v
                                              for slot, field in (("dir1", "dir1"), ("metric", "scr"), ("dir2", "dir2"))})
                   for name, v in per_run.items()]
    else:  # tpp
        slots = (("total_metric", "tpp"), ("intended_diff_only", "intended"), ("unintended_diff_only", "unintended"))
        metrics = {"tpp_metrics": {f"tpp_threshold_{n}_{slot}": take(f"{field}_n{n}", None)
                                   for n in _SAEBENCH_NS for slot, field in slots}}
        details = [dict(dataset_name=name, **{f"tpp_threshold_{n}_{slot}": v[str(n)][field]
                                              for n in _SAEBENCH_NS if str(n) in v for slot, field in slots})
                   for name, v in r.get("per_task", {}).items()]
    return metrics, details, nan, used


def saebench_files(result, sae_dir, metrics=None):
    """{file name: SAEBench output dict} for the metrics of one SAE's eval.json `result` (all the
    SAEBench types it holds, or those named in `metrics`). SAEBench names an SAE by a release and
    an id: here the run folder's and the SAE folder's names. Values are plain JSON, with NaN only
    in a slot SAEBench requires and we have no number for (listed under
    eval_result_unstructured["nan_in_saebench_slots"])."""
    sae_cfg = result.get("sae_cfg", {})
    model_name = sae_cfg.get("model_name") or sae_cfg.get("model") or ""
    cfg_dict = {**sae_cfg, "architecture": sae_cfg.get("arch"), "model_name": model_name,
                "hook_name": sae_cfg.get("hook", f"blocks.{sae_cfg.get('layer')}.hook_resid_post")}
    folder = os.path.abspath(sae_dir)
    files = {}
    for metric in metrics or _SAEBENCH_TYPES:
        r = result.get(metric)
        if metric not in _SAEBENCH_TYPES or not isinstance(r, dict):
            continue
        structured, details, nan, used = _saebench_metrics(metric, r)
        unstructured = {key: value for key, value in r.items() if key not in used}
        if nan:
            unstructured["nan_in_saebench_slots"] = nan
        unstructured["evaluate_settings"] = result.get("settings", {})
        files[f"{metric}.json"] = dict(
            eval_type_id=_SAEBENCH_TYPES[metric],
            eval_config=_saebench_config(metric, result.get("settings", {}), model_name),
            eval_id=str(uuid.uuid4()), datetime_epoch_millis=int(time.time() * 1000),
            eval_result_metrics=structured, eval_result_details=details,
            sae_bench_commit_hash=f"none: evaluate.py's reimplementation of sae-bench {_SAEBENCH_VERSION}",
            sae_lens_id=os.path.basename(folder), sae_lens_release_id=os.path.basename(os.path.dirname(folder)),
            sae_lens_version=None, sae_cfg_dict=cfg_dict, eval_result_unstructured=unstructured)
    return files


def write_saebench_files(result, sae_dir, out_dir="", metrics=None):
    """Write saebench_files: beside eval.json as <sae>/saebench/<metric>.json (out_dir ""), or
    in SAEBench's own layout, out_dir/<eval_type_id>/<release>_<id>_eval_results.json, the
    folder its graphing code (sae_bench_utils/graphing_utils.py) reads. Returns the paths."""
    paths = []
    for name, doc in saebench_files(result, sae_dir, metrics).items():
        path = (os.path.join(out_dir, doc["eval_type_id"],
                             f"{doc['sae_lens_release_id']}_{doc['sae_lens_id']}_eval_results.json")
                if out_dir else os.path.join(sae_dir, "saebench", name))
        _write_atomic(path, json.dumps(doc, indent=1))
        paths.append(path)
    return paths


# -----------------------------------------------------------------------------
# main: find SAEs, group them by (model, layer), run the metrics, write eval.json and tables

_RUNNERS = {"core": run_core, "absorption": run_absorption, "sparse_probing": run_sparse_probing,
            "scr": run_scr, "tpp": run_tpp, "ood": run_ood}


def find_sae_dirs(run):
    """The SAE folders of a run (its subfolders with sae.safetensors), or the folder itself."""
    if os.path.isfile(os.path.join(run, "sae.safetensors")):
        return [run]
    found = sorted(os.path.join(run, d) for d in os.listdir(run)
                   if os.path.isfile(os.path.join(run, d, "sae.safetensors")))
    if not found:
        raise FileNotFoundError(f"{run}: no sae.safetensors in it or in its subfolders")
    def target_k(folder):
        return sae_lib.read_cfg(folder)["k"] or 0
    return sorted(found, key=lambda d: (target_k(d), d))


def training_lock(sae_dir):
    """The train.lock a running train.py holds on this SAE's run folder (or on the SAE folder
    itself), else None. train.py exports its SAEs while it runs, so their numbers would describe
    an SAE that is about to change."""
    for folder in (sae_dir, os.path.dirname(sae_dir)):
        path = os.path.join(folder, "train.lock")
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return path
            finally:
                os.close(fd)
    return None


def model_key(model_dir):
    """The model's identity for the activation cache: its real path and its weight files' stamps."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith((".safetensors", "config.json")))
    stamps = [(f, os.path.getsize(os.path.join(model_dir, f)), os.path.getmtime(os.path.join(model_dir, f)))
              for f in files]
    return [os.path.realpath(model_dir), stamps]


def load_llm(cfg, model_dir, layer, tokens_dir, device):
    arch = model_lib.read_config(model_dir).arch
    dtype = getattr(torch, model_lib.resolve_dtype(cfg.llm_dtype, arch, device))
    m = model_lib.load(model_dir, device, dtype)
    m.eval()
    with open(os.path.join(model_dir, "config.json")) as f:
        max_positions = json.load(f).get("max_position_embeddings", cfg.ood_max_tokens)
    if m.cfg.d_model <= 256:
        print(f"NOTE: {model_dir} is a tiny model (d_model={m.cfg.d_model}; configs/tiny.py's has "
              "RANDOM weights): its numbers mean nothing about the paper, they only show that every "
              "metric runs end to end.")
    return SimpleNamespace(m=m, tokenizer=prepare.load_tokenizer(model_dir), model_dir=model_dir, layer=layer,
                           dtype=dtype,
                           key=model_key(model_dir), cache_dir=cfg.cache_dir, batch_rows=cfg.llm_batch_rows,
                           tokens_dir=tokens_dir, max_positions=max_positions)


def load_sae(path, d_model, cfg, device):
    sae = sae_lib.load(path, device).to(getattr(torch, cfg.sae_dtype))
    sae.eval()
    if sae.cfg["d_in"] != d_model:
        raise ValueError(f"{path}: SAE d_in={sae.cfg['d_in']} but the model's d_model={d_model}")
    norms = sae.W_dec.detach().float().norm(dim=1)
    if (norms - 1).abs().max() > 1e-2:  # §0: every metric assumes unit-norm decoder rows
        raise ValueError(f"{path}: decoder rows are not unit norm (norms from {norms.min():.4f} to "
                         f"{norms.max():.4f}); the metrics assume ‖W_dec[f]‖ = 1 (§0)")
    return sae


# What each metric's number depends on besides the SAE, the model and the data: the settings
# whose names start with these (the shared ones: _SHARED_SETTINGS). A metric whose record in
# eval.json ("computed_from") differs from the present one is computed again.
_METRIC_SETTINGS = {"core": ("core_",), "absorption": ("absorption_",), "sparse_probing": ("probing_",),
                    "scr": ("scr_", "probing_", "ablation_", "headline_n"),
                    "tpp": ("tpp_", "scr_", "probing_", "ablation_", "headline_n"), "ood": ("ood_",)}
_SHARED_SETTINGS = ("eval_seed", "sae_dtype", "bootstrap_samples")


def _file_sha256(path):
    """sha256 of a file, None when it does not exist."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def computed_from(cfg, model_dir, layer, tokens_dir, device, sae_dir):
    """{metric: what its number would be computed from now}: the SAE file's sha256, the model
    (folder, weight files' stamps, layer, dtype), the activation format (_CACHE_FORMAT), the data
    (tokens meta.json for core on val.bin; each eval set's meta.json) and the settings that affect
    it, in JSON's types."""
    arch = model_lib.read_config(model_dir).arch
    model = {"path": os.path.realpath(model_dir), "layer": layer,
             "files": hashlib.sha256(json.dumps(model_key(model_dir)).encode()).hexdigest()[:16],
             "llm_dtype": model_lib.resolve_dtype(cfg.llm_dtype, arch, device)}
    sets = sorted(os.listdir(cfg.eval_data_dir)) if os.path.isdir(cfg.eval_data_dir) else []
    eval_data = {"eval_data_dir": os.path.realpath(cfg.eval_data_dir),
                 "sets": {n: _file_sha256(os.path.join(cfg.eval_data_dir, n, "meta.json")) for n in sets}}
    tokens = {"tokens_dir": os.path.realpath(tokens_dir) if tokens_dir else "",
              "meta_sha256": _file_sha256(os.path.join(tokens_dir, "meta.json")) if tokens_dir else None}
    settings = json.loads(json.dumps(configurator.defaults(vars(cfg))))
    sae_sha256 = _file_sha256(os.path.join(sae_dir, "sae.safetensors"))
    return {name: {"sae_sha256": sae_sha256, "model": model, "activations": _CACHE_FORMAT,
                   "data": tokens if name == "core" and cfg.core_dataset == "val" else eval_data,
                   "settings": {k: v for k, v in settings.items()
                                if k in _SHARED_SETTINGS or k.startswith(prefixes)}}
            for name, prefixes in _METRIC_SETTINGS.items()}


def _why_stale(recorded, now):
    """None when a metric's record matches the present inputs, else what changed, in words."""
    if not recorded:
        return "eval.json does not record what it was computed from"
    changed = [what for key, what in (("sae_sha256", "SAE file"), ("model", "model"), ("data", "data"),
                                      ("activations", "the way the LLM activations are computed"))
               if recorded.get(key) != now[key]]
    settings = sorted(k for k in now["settings"].keys() | recorded.get("settings", {}).keys()
                      if now["settings"].get(k) != recorded.get("settings", {}).get(k))
    what = changed + ([f"settings ({', '.join(settings)})"] if settings else [])
    return f"{', '.join(what)} changed" if what else None


def read_eval_json(path):
    return model_lib.read_json_object(path, "; delete it to recompute its metrics") if os.path.exists(path) else {}


def save_metric(d, name, value, record, **about):
    """Merge one metric into d/eval.json under its lock (another evaluate.py may be writing another
    metric of the same SAE; they take turns) and return the merged contents."""
    path = os.path.join(d, "eval.json")
    with prepare.locked(path + ".lock"):
        results = read_eval_json(path)
        results.update(about)
        results[name] = value
        results.setdefault("computed_from", {})[name] = record
        _write_atomic(path, json.dumps(results, indent=1, allow_nan=False))
    return results


def evaluate_group(cfg, model_dir, layer, tokens_dir, sae_dirs, device):
    """Every requested metric for the SAEs of one (model, layer); eval.json after each metric. A
    metric eval.json holds is reused when it was computed from the same SAE file, model, data and
    settings, and computed again (saying why) when not."""
    results, records, pending = {}, {}, {name: [] for name in cfg.metrics}
    for d in sae_dirs:
        results[d] = read_eval_json(os.path.join(d, "eval.json"))
        records[d] = computed_from(cfg, model_dir, layer, tokens_dir, device, d)
        reused = []
        for name in cfg.metrics:
            why = "rerun=True" if cfg.rerun else _why_stale(results[d].get("computed_from", {}).get(name),
                                                             records[d][name])
            if name not in results[d]:
                pending[name].append(d)
            elif why:
                print(f"recomputing {name} for {d}: {why}")
                pending[name].append(d)
            else:
                reused.append(name)
        if reused:
            print(f"reused {', '.join(reused)} for {d}: eval.json was computed from this SAE file, model, "
                  "data and settings")
        for name in sorted(set(_RUNNERS) - set(cfg.metrics) & set(results[d])):  # not asked for now
            why = _why_stale(results[d].get("computed_from", {}).get(name), records[d][name])
            if why:  # never reported as this SAE's number
                print(f"left {name} of {d} out of the report: {why} (add it to --metrics to recompute it)")
                del results[d][name]
    todo = [name for name in cfg.metrics if pending[name]]
    if not todo:
        return results
    unwritable = [d for d in sae_dirs if not os.access(d, os.W_OK)]
    if unwritable:
        raise PermissionError(f"{unwritable[0]} is not writable: evaluate.py writes eval.json there")
    print(f"\n=== {model_dir} layer {layer}: {len(sae_dirs)} SAE(s), metrics {todo}")
    llm = load_llm(cfg, model_dir, layer, tokens_dir, device)
    for name in todo:
        saes = [load_sae(d, llm.m.cfg.d_model, cfg, device) for d in pending[name]]
        t0 = time.time()
        print(f"--- {name} ({len(saes)} SAE(s))")
        torch.manual_seed(cfg.eval_seed)
        for d, sae, r in zip(pending[name], saes, _RUNNERS[name](llm, saes, cfg)):
            # eval.json stays JSON: null + a reason, never NaN
            results[d] = save_metric(d, name, json_ready(r)[0], records[d][name], sae=d, model_dir=model_dir,
                                     layer=layer, sae_cfg=sae.cfg, settings=configurator.defaults(vars(cfg)))
            write_saebench_files(results[d], d, cfg.saebench_json_dir, [name])  # the same numbers, SAEBench's schema
        print(f"--- {name}: {time.time() - t0:.0f} s")
    return results


def main(argv):
    # a positional argument is a config file (*.py) or a run folder, which must exist
    runs = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
    cfg = configurator.configure(globals(), [a for a in argv if a not in runs], __doc__)
    if not runs:
        raise ValueError("usage: python evaluate.py [config.py] [--key=value ...] out/<run> [out/<run> ...]")
    for run in runs:
        if not os.path.isdir(run):
            raise FileNotFoundError(f"{run}: no such run folder (a folder of SAEs from train.py, or one "
                                    "SAE's folder; config files end in .py)")
    if len({os.path.realpath(run) for run in runs}) < len(runs):
        raise ValueError(f"a run folder is named twice in {runs}: name each run once")
    unknown = set(cfg.metrics) - set(_RUNNERS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(_RUNNERS)}")
    if cfg.ablation_positions not in _ABLATION_LABELS:
        raise ValueError(f"ablation_positions must be one of {list(_ABLATION_LABELS)}, "
                         f"got {cfg.ablation_positions!r}")
    if {"scr", "tpp"} & set(cfg.metrics) and cfg.headline_n not in cfg.ablation_ns:
        raise ValueError(f"headline_n={cfg.headline_n} is not in ablation_ns={cfg.ablation_ns}")
    device = model_lib.resolve_device(cfg.device)
    if torch.device(device).type == "cpu":
        model_lib.keep_freed_memory()  # core's 262k-vocabulary logits are 1 GB a pass
    groups, models = {}, {}
    for run in runs:
        for d in find_sae_dirs(run):
            lock = training_lock(d)
            if lock:
                raise BlockingIOError(f"{d} is still training (train.py holds {lock}): evaluate it when "
                                      "that run has finished")
            sae_cfg = sae_lib.read_cfg(d)
            recorded = (sae_cfg.get("model"), sae_cfg.get("layer"))
            chosen = (cfg.model_dir or recorded[0], cfg.layer if cfg.layer >= 0 else recorded[1])
            if None in chosen:
                raise ValueError(f"{d}/cfg.json records no model/layer: pass --model_dir and --layer")
            if cfg.layer >= 0 and recorded[1] is not None and recorded[1] != cfg.layer:
                raise ValueError(f"{d} was trained on layer {recorded[1]}, but layer={cfg.layer} "
                                 "was asked for")
            tokens = cfg.tokens_dir or sae_cfg.get("tokens_dir", "")
            groups.setdefault((*chosen, tokens), []).append(d)
            models.setdefault((os.path.realpath(chosen[0]), chosen[1]), run)
    if len(runs) >= 2 and len(models) > 1:
        (a, run_a), (b, run_b) = list(models.items())[:2]
        raise ValueError(f"{run_a} is on {a[0]} layer {a[1]} but {run_b} on {b[0]} layer {b[1]}: a comparison "
                         "needs one model and layer; evaluate these runs in separate calls")
    # the same arm and seed twice is refused now, not after every metric has been computed
    compare.group_arms({run: {os.path.relpath(d, run) if d != run else os.path.basename(run):
                      {"sae_cfg": sae_lib.read_cfg(d), "sae": d} for d in find_sae_dirs(run)} for run in runs})
    results = {}
    for (model_folder, layer_index, tokens), dirs in groups.items():
        results.update(evaluate_group(cfg, model_folder, layer_index, tokens, dirs, device))
    by_run = {run: {os.path.relpath(d, run) if d != run else os.path.basename(run): results[d]
                    for d in find_sae_dirs(run)} for run in runs}
    print()
    compare.report(by_run, cfg.comparison_file)  # the across-run stage: `python compare.py RUN...` redoes it

if __name__ == "__main__":
    configurator.run(main)
