"""
The two inner loops stripped down for timing, each against the reference implementation in the
same run (warm-up first, then interleaved repeats), printed as one table. Each side shows the
median and the [min-max] of its repeats; a row is marked "noisy" where the two spreads overlap,
so that run cannot tell the sides apart whatever the ratio of the medians:

  harvest   tokens/s of resid_post at the hooked layer of a random-weight Pythia-160M-shaped model
            (and a Gemma-2-2B-shaped one cut to a few blocks, in fp32 here, and a Gemma 3 270M-shaped
            one in the dtype train.py's llm_dtype=auto picks): ours (model.resid_post stops at the
            layer) vs transformers computing the same hidden state, in the same dtype, (a) the usual
            way, a full forward with output_hidden_states=True, and (b) stopped right after the
            layer's block, which is what dictionary_learning (nnsight's stop) and SAELens
            (stop_at_layer) do.
  bf16      our Gemma 3 270M-shaped harvest in bf16 vs fp32 on the same weights: whether bf16 pays
            on this device (on a CPU without bf16 matrix units it does not; model.resolve_dtype).
  cache     training one SAE from train.py's activation cache (train.Harvester reading its chunks,
            then train.sae_step) vs harvesting the same LLM batches and training on them, on the
            Gemma 3 270M-shaped model: what one more SAE seed costs per token with and without it.
  sae step  tokens/s of one training step exactly as train.py runs it (train.sae_step: the step,
            the dead counters and the threshold EMA), eager and torch.compile'd, vs dictionary_learning's
            MatryoshkaBatchTopKTrainer.update on the same batch with the same dead latents (so both
            run aux-k), i.e. the same math. And (the first shape) the step under bf16 autocast vs
            fp32, as sae_autocast runs it where the device has bf16 units.
  roofline  the step's necessary matrix work, two GEMMs of 2·B·d·F FLOPs (encoder forward + encoder
            weight gradient; the decoder is sparse), at the GEMM rate of a (B, d) @ (d, F) product
            (into a preallocated output) in the step's dtype, measured in the same run: "% of limit".

On a CPU the process runs with model.keep_freed_memory(), as train.py does: glibc's default of
mapping fresh pages for every big tensor costs both SAE steps here speed (dictionary_learning's most).

  python bench.py                          # the full table, ~10 min on 2 CPU cores
  python bench.py --quick=True             # tiny shapes, no compile: a smoke test in seconds
  python bench.py --json_path=bench.json   # also write the table as JSON
  python bench.py --only=gemma-3           # only the rows whose name contains this

  python bench.py --device=cuda --gpu_report=out/gpu.json   # GPU figures; sized for < 8 min, not yet run on one

--gpu_report (CUDA only; refused on a CPU) runs the table's rows on the GPU, then train.py in a
subprocess at configs/pythia160m.py's shape (Pythia-160M, layer 8, ctx 1024, four SAEs of 4096
latents, batch 2048) on a random-weight Pythia-160M and the stdlib tokens, for gpu_train_steps
steps, and writes every figure (the GPU, the rows, the run's wall time and tokens/s) to one JSON.

transformers (a test-only dependency) and dictionary_learning are imported lazily; their rows are
skipped with a note when they are missing. dictionary-learning pulls torchvision, which breaks next
to the CPU build of torch, so it lives in its own venv:

  python -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0 -r requirements.txt -r requirements-test.txt
  echo "torch==2.13.0" > /tmp/torch-pin.txt
  .venv-bench/bin/pip install dictionary-learning -c /tmp/torch-pin.txt
  .venv-bench/bin/pip uninstall -y torchvision
  .venv-bench/bin/python bench.py
"""
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from safetensors.torch import save_file

import configurator
import model as model_lib
import prepare
import sae as sae_lib
import train

# -----------------------------------------------------------------------------
quick = False                      # tiny shapes and no compile: the smoke test
threads = 2                        # torch threads for every row (the machine has 2 cores)
device = "cpu"
repeats = 5                        # timed runs per row; the median is reported
warmup = 1                         # untimed runs first (the compiled step compiles here)
# harvest
layer = 8                          # hooked layer of the Pythia-shaped model (12 blocks)
ctx_lens = [128, 1024]
harvest_tokens = 2048              # tokens per LLM forward: harvest_tokens // ctx rows
gemma_layers = 4                   # Gemma-2-2B shape with this many blocks, hooked at the last but one (0 = skip)
gemma_dtype = "float32"            # Gemma runs in bfloat16 on a GPU, but bf16 GEMMs crawl on this CPU (~10 GFLOP/s)
gemma_tokens = 1024                # one row of the longest ctx: the 256k-vocab head makes the full forward slow
gemma3_layer = 6                   # hooked layer of the Gemma 3 270M-shaped model (18 blocks; -1 = skip)
gemma3_dtype = "auto"              # float32 | bfloat16 | auto (as train.py's llm_dtype: bf16 on a CPU with bf16 units)
cache_batches = 4                  # cache row: LLM batches (harvest_tokens each, ctx_lens[0]) per timed run
# sae step
batch_size = 2048                  # B, the paper's
sae_d_in = 768                     # d: Pythia-160M's width
sae_shapes = [[4096, 20], [4096, 160], [16384, 20], [16384, 160]]  # [F, k]
dead_fraction = 0.01               # latents held dead so aux-k runs, the same ones in both implementations
compile = True                     # also time the torch.compile'd step
# output
cache_dir = ""                     # where the random checkpoints are written once ("" = <tmp>/sae-bench)
json_path = ""                     # write the table here too
only = ""                          # run only the rows whose name contains this ("" = all)
seed = 0
# GPU figures
gpu_report = ""                    # CUDA only: the rows + a short train.py run, all figures in this JSON
gpu_train_steps = 300              # SAE steps of that run at configs/pythia160m.py's shape
gpu_train_timeout = 300            # seconds; the whole report stays under 8 minutes

_PYTHIA = dict(  # EleutherAI/pythia-160m-deduped's config.json
    architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", vocab_size=50304, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
_GEMMA = dict(  # google/gemma-2-2b's config.json, blocks cut to gemma_layers
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000, hidden_size=2304,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=9216,
    hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0)
_GPU = dict(sae_shapes=[[4096, 20], [4096, 160]])  # the paper's width only: compiling takes GPU minutes
_GEMMA3 = dict(  # google/gemma-3-270m's config.json
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, hidden_size=640,
    intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, attn_logit_softcapping=None,
    final_logit_softcapping=None, sliding_window=512, _sliding_window_pattern=6,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=32768,
    bos_token_id=2, eos_token_id=1, pad_token_id=0)
_QUICK = dict(ctx_lens=[32], harvest_tokens=128, cache_batches=3, gemma_tokens=64, layer=1, gemma_layers=2, batch_size=256,
              sae_d_in=64, sae_shapes=[[512, 8]], repeats=2, warmup=1, compile=False)


def timed(functions, cfg):
    """{name: [seconds of each repeat]} of each function, run round-robin so load changes hit all alike."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in functions}
    for i in range(cfg.warmup + cfg.repeats):
        for name, fn in functions.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= cfg.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def rates(times, count):
    """{name: [min, median, max] of count / seconds} over each function's repeats."""
    return {name: [count / max(t), count / statistics.median(t), count / min(t)] for name, t in times.items()}


def versus(case, ours, vs_name, vs, **extra):
    """A table row: our median against the rival's, both spreads kept. "noisy" when the spreads
    overlap: then this run cannot say which side is faster, whatever the ratio of medians."""
    return dict(row=case, ours_tok_s=ours[1], ours_spread=ours, vs=vs_name, vs_tok_s=vs[1], vs_spread=vs,
                ratio=ours[1] / vs[1], noisy=ours[0] <= vs[2] and vs[0] <= ours[2], **extra)


def optional(module):
    """Import a comparison library if it is installed, else None (its rows say so)."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as e:  # ImportError, or a broken install such as torchvision's next to CPU torch
        print(f"note: {module} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]}); its rows are skipped")
        return None


# -----------------------------------------------------------------------------
# harvest: our forward to the hooked layer vs transformers

def checkpoint(cfg, name, hub_config, dtype):
    """A random-weight model folder in the hub's layout, written once (transformers' save_pretrained)."""
    folder = os.path.join(cfg.cache_dir or os.path.join(tempfile.gettempdir(), "sae-bench"), name)
    if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")) and \
            not os.path.exists(os.path.join(folder, "model.safetensors")):
        from transformers import AutoConfig, AutoModelForCausalLM
        torch.manual_seed(cfg.seed)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hub_config)).to(dtype)
        hf.save_pretrained(folder + ".tmp")
        with open(os.path.join(folder + ".tmp", "config.json"), "w") as f:
            json.dump(hub_config, f, indent=2)  # the hub's spelling, as prepare.py downloads it
        os.replace(folder + ".tmp", folder)
    return folder


def random_rows(cfg, hub_config, ctx, tokens):
    """tokens // ctx rows of random ordinary ids (at least one row), BOS first as train.py feeds them."""
    generator = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(3, hub_config["vocab_size"], (max(1, tokens // ctx), ctx), generator=generator)
    idx[:, 0] = hub_config["bos_token_id"]
    return idx.to(cfg.device)


class _Stop(Exception):
    pass


def harvest_rows(cfg, transformers, name, hub_config, hook, dtype, ctx_lens, tokens):
    rows = []
    if not ctx_lens:
        return rows
    if transformers is None:
        return [dict(row=f"harvest {name}", note="skipped: transformers is not installed")]
    folder = checkpoint(cfg, name, hub_config, dtype)
    ours = model_lib.load(folder, cfg.device, dtype)
    full = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(cfg.device).eval()

    def cut(idx):
        """transformers stopped by an exception right after block `hook`, as nnsight's stop() in
        dictionary_learning does (SAELens: stop_at_layer); no later block and no LM head run."""
        def stop(module, args, out):
            raise _Stop(out[0] if isinstance(out, tuple) else out)
        handle = full.base_model.layers[hook].register_forward_hook(stop)
        try:
            full.base_model(idx)
        except _Stop as e:
            return e.args[0]
        finally:
            handle.remove()

    for ctx in ctx_lens:
        idx = random_rows(cfg, hub_config, ctx, tokens)
        runs = {"ours": lambda: ours.resid_post(idx, hook),
                "full": lambda: full(idx, output_hidden_states=True).hidden_states[hook + 1],
                "cut": lambda: cut(idx)}
        with torch.no_grad():
            reference = runs["full"]().float()
            for other in ("ours", "cut"):  # the same hidden state, or the comparison means nothing
                error = (runs[other]().float() - reference).norm() / reference.norm()
                if error > (1e-4 if dtype == torch.float32 else 3e-2):
                    raise RuntimeError(f"{name}: {other} differs from transformers at layer {hook} (rel. error {error:.2e})")
            tok_s = rates(timed(runs, cfg), idx.numel())
        case = f"harvest {name} L{hook} ctx{ctx}"
        print(f"{case}: " + ", ".join(f"{key} {v[1]:,.0f} tok/s" for key, v in tok_s.items()), flush=True)
        rows.append(versus(case, tok_s["ours"], "transformers full forward + output_hidden_states", tok_s["full"]))
        rows.append(versus(case, tok_s["ours"], f"transformers stopped after block {hook}", tok_s["cut"]))
    return rows


def bf16_rows(cfg, name, hub_config, hook, ctx_lens, tokens):
    """Our forward to the hooked layer in bf16 vs in fp32, on the same weights."""
    folder = checkpoint(cfg, name, hub_config, torch.float32)
    models = {dtype: model_lib.load(folder, cfg.device, dtype) for dtype in ("bfloat16", "float32")}
    rows = []
    for ctx in ctx_lens:
        idx = random_rows(cfg, hub_config, ctx, tokens)
        with torch.no_grad():
            tok_s = rates(timed({dtype: lambda m=m: m.resid_post(idx, hook) for dtype, m in models.items()}, cfg),
                          idx.numel())
        case = f"bf16 {name} L{hook} ctx{ctx}"
        print(f"{case}: bf16 {tok_s['bfloat16'][1]:,.0f} tok/s, fp32 {tok_s['float32'][1]:,.0f} tok/s", flush=True)
        rows.append(versus(case, tok_s["bfloat16"], "ours in fp32", tok_s["float32"]))
    return rows


# -----------------------------------------------------------------------------
# SAE step: train.py's step vs dictionary_learning's MatryoshkaBatchTopKTrainer.update

def our_step(cfg, train_cfg, d, F, k, x, dead_mask, compiled, autocast=None):
    """train.py's inner loop body for one SAE (train.sae_step: the step, dead counters, threshold
    EMA), late in training (aux-k and the threshold EMA on); fp32 unless given an autocast."""
    sae = sae_lib.SAE(d, F, arch="matryoshka_batchtopk", k=k, seed=cfg.seed).to(cfg.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999), fused=True)  # as train.py
    loss_fn = torch.compile(sae.training_loss) if compiled else sae.training_loss
    dead = torch.zeros(F, dtype=torch.long, device=cfg.device)

    def step(batch=x):
        dead.copy_(dead_mask.long() * 10**12)  # the same dead latents every step
        train.sae_step(sae, loss_fn, optimizer, dead, batch, 10**6, 3e-4, train_cfg, 1,
                       autocast or contextlib.nullcontext())
    return step


def reference_step(cfg, d, F, k, x, dead_mask):
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    trainer = MatryoshkaBatchTopKTrainer(
        steps=10**6, activation_dim=d, dict_size=F, k=k, layer=cfg.layer, lm_name="bench",
        group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32], lr=3e-4, seed=cfg.seed,
        device=cfg.device)
    count = [2000]  # past its threshold_start_step (1000), so its threshold EMA runs, as ours does

    def step():
        trainer.num_tokens_since_fired.copy_(dead_mask.long() * 10**9)  # the same dead latents
        trainer.update(count[0], x)
        count[0] += 1
    return step


def sae_rows(cfg, F, k, rival):
    """Our eager fp32 step timed interleaved with a rival: our compiled step, dictionary_learning's,
    or ours under bf16 autocast ("bf16", as train.py's sae_autocast runs it where bf16 is native)."""
    d, B = cfg.sae_d_in, cfg.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(B, d, generator=generator).to(cfg.device) / d ** 0.5  # E||x||² = 1, as train.py scales
    dead_mask = (torch.rand(F, generator=generator) < cfg.dead_fraction).to(cfg.device)
    train_cfg = configurator.configure(vars(train), [])  # train.py's defaults (grad_clip)
    W_enc = torch.randn(d, F, generator=generator).to(cfg.device)
    gemm_out = torch.empty(B, F, device=cfg.device)
    runs = {"gemm": lambda: torch.mm(x, W_enc, out=gemm_out),
            "eager": our_step(cfg, train_cfg, d, F, k, x, dead_mask, False)}
    if rival == "compiled":
        runs["compiled"] = our_step(cfg, train_cfg, d, F, k, x, dead_mask, True)
    elif rival == "reference":
        runs["reference"] = reference_step(cfg, d, F, k, x, dead_mask)
    elif rival == "bf16":
        # the floor in bf16 only where the step's products run in bf16: on a CPU sae.py's sparse
        # step keeps them fp32 under autocast (SAE.training_loss), so its floor stays fp32
        if not cfg.device.startswith("cpu"):
            x16, W16, out16 = x.bfloat16(), W_enc.bfloat16(), gemm_out.bfloat16()
            runs["gemm_bf16"] = lambda: torch.mm(x16, W16, out=out16)
        autocast = torch.autocast(torch.device(cfg.device).type, torch.bfloat16)
        runs["bf16"] = our_step(cfg, train_cfg, d, F, k, x, dead_mask, False, autocast)
    times = timed(runs, cfg)
    tok_s = rates({name: t for name, t in times.items() if not name.startswith("gemm")}, B)
    # the floor: the step's two necessary GEMMs (encoder forward, encoder weight gradient; the
    # decoder is sparse), 2·B·d·F FLOPs each, at the median rate of the (B, d) @ (d, F) product
    gemm = {name: 2 * B * d * F / statistics.median(t) for name, t in times.items() if name.startswith("gemm")}
    ours = {"compiled": "compiled", "bf16": "bf16"}.get(rival, "eager")
    dtype = "bf16" if "gemm_bf16" in gemm and ours == "bf16" else "fp32"
    gemm_flops = gemm["gemm_bf16" if dtype == "bf16" else "gemm"]
    limit = gemm_flops / (4 * d * F)  # tokens/s if the step were only its two necessary GEMMs
    case = f"sae step d{d} F{F} k{k} B{B}"
    print(f"{case}: " + ", ".join(f"{name} {v[1]:,.0f} tok/s" for name, v in tok_s.items())
          + "".join(f", {n.replace('gemm', 'GEMM').replace('_', ' ')} {v / 1e9:.0f} GFLOP/s" for n, v in gemm.items()),
          flush=True)
    floor = dict(gemm_dtype=dtype, gemm_gflops=gemm_flops / 1e9, limit_tok_s=limit,
                 pct_of_limit=100 * tok_s[ours][1] / limit)
    name = f"{case} {'bf16 autocast' if ours == 'bf16' else ours}"
    if rival == "compiled":
        return [versus(name, tok_s["compiled"], "ours eager", tok_s["eager"], **floor)]
    if rival == "reference":
        return [versus(name, tok_s["eager"], "dictionary_learning MatryoshkaBatchTopKTrainer.update",
                       tok_s["reference"], **floor)]
    if rival == "bf16":
        return [versus(name, tok_s["bf16"], "ours eager fp32", tok_s["eager"], **floor)]
    return [dict(row=name, ours_tok_s=tok_s["eager"][1], ours_spread=tok_s["eager"],
                 note="dictionary_learning is not importable: no reference", **floor)]


# -----------------------------------------------------------------------------
# the activation cache: one SAE trained from it vs harvested and trained, as train.py runs both

def cache_rows(cfg, name, hub_config, hook, dtype, ctx):
    """train.Harvester reading a filled activation cache vs running the LLM (masks, resid_post),
    each followed by our eager step on what it gave: what one more SAE seed costs per token with
    the cache, and without. The model is random, the token ids too; the timing does not care."""
    d, B, (F, k) = hub_config["hidden_size"], cfg.batch_size, cfg.sae_shapes[0]
    folder = checkpoint(cfg, name, hub_config, torch.float32)
    m = model_lib.load(folder, cfg.device, dtype)
    work = tempfile.mkdtemp(prefix="cache-bench-")
    rows = max(1, cfg.harvest_tokens // ctx)
    ids = torch.randint(3, hub_config["vocab_size"], (cfg.cache_batches * rows * ctx,),
                        generator=torch.Generator().manual_seed(cfg.seed)).numpy().astype("uint32")
    ids.tofile(os.path.join(work, "train.bin"))
    prepare.write_json(os.path.join(work, "meta.json"), dict(dtype="uint32", train_tokens=len(ids)))
    train_cfg = configurator.configure(vars(train), [
        f"--tokens_dir={work}", f"--layer={hook}", f"--ctx_len={ctx}", f"--llm_batch_rows={rows}",
        f"--llm_dtype={dtype}", f"--batch_size={B}", "--mask_prob=0.3"])
    mask_id = hub_config["vocab_size"] - 1
    os.makedirs(os.path.join(work, "cache"))
    harvesters = {"cache": train.Harvester(m, train_cfg, mask_id, 0, 1, os.path.join(work, "cache")),
                  "harvest": train.Harvester(m, train_cfg, mask_id, 0, 1)}
    dead_mask = torch.rand(F, generator=torch.Generator().manual_seed(cfg.seed)) < cfg.dead_fraction
    step = our_step(cfg, train_cfg, d, F, k, torch.zeros(B, d, device=cfg.device), dead_mask.to(cfg.device), False)
    trained = []

    def run(harvester):
        harvester.batches_done = 0  # the same LLM batches every repeat
        x = torch.cat([harvester.next_acts() for _ in range(cfg.cache_batches)]).float()
        x = x / x.pow(2).sum(-1).mean().sqrt()  # as train.py scales
        trained.append(len(x) // B * B)
        for i in range(len(x) // B):
            step(x[i * B:(i + 1) * B])

    run(harvesters["cache"])  # fills the cache (harvests and writes every chunk)
    try:
        tok_s = rates(timed({key: lambda h=h: run(h) for key, h in harvesters.items()}, cfg), trained[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nbytes = 2 if dtype == "bfloat16" else 4
    case = f"cache {name} L{hook} ctx{ctx} F{F} k{k}"
    print(f"{case}: from the cache {tok_s['cache'][1]:,.0f} tok/s, harvest + train {tok_s['harvest'][1]:,.0f} tok/s "
          f"({dtype}; the cache takes {d * nbytes + 1} bytes a token, {(d * nbytes + 1) / 2**20 * 1e6:,.0f} MiB "
          f"per million)", flush=True)
    return [versus(case, tok_s["cache"], f"harvest ({dtype}) + train, as without the cache", tok_s["harvest"],
                   cache_bytes_per_token=d * nbytes + 1)]


# -----------------------------------------------------------------------------
# GPU report: a short real training run at Pythia-160M's shape

def random_pythia(folder, hub_config, tokenizer_dir, seed):
    """A random-weight GPT-NeoX folder from model.py's own init, saved under the HF tensor names
    (random values need no layout conversion), so the run needs no transformers; the tokenizer
    is another folder's (its ids must fit the config's vocabulary)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hub_config, f, indent=2)
    torch.manual_seed(seed)
    cfg = model_lib.read_config(folder)
    state = {model_lib.hf_tensor_names(cfg, name)[0]: t.contiguous()
             for name, t in model_lib.Transformer(cfg).state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as src, \
            open(os.path.join(folder, "tokenizer.json"), "w") as dst:
        dst.write(src.read())


def training_figures(log, wall_s, steps, batch_size):
    """Figures of one train.py run from its wall time and its log: the last logged harvest and SAE
    rates and the buffer fill time (None where the log does not say)."""
    rates = re.findall(r"harvest ([\d.]+)k tok/s, sae ([\d.]+)k tok/s", log)
    fill = re.findall(r"buffer filled in ([\d.]+)s", log)
    return dict(steps=steps, tokens=steps * batch_size, wall_s=wall_s,
                tok_s_end_to_end=steps * batch_size / wall_s,
                harvest_tok_s_last_log=float(rates[-1][0]) * 1e3 if rates else None,
                sae_tok_s_last_log=float(rates[-1][1]) * 1e3 if rates else None,
                buffer_fill_s=float(fill[-1]) if fill else None)


def training_run(cfg, workdir, hub_config, steps, extra=()):
    """train.py configs/pythia160m.py in a subprocess on a random model of hub_config's shape and
    configs/tiny.py's stdlib tokens (prepare.py); its figures, or its return code and log tail."""
    tiny = os.path.join(workdir, "tiny")
    prepare.main([os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py"),
                  f"--model_dir={tiny}/model", f"--tokens_dir={tiny}/tokens", "--eval_sets=[]"])
    random_pythia(os.path.join(workdir, "model"), hub_config, os.path.join(tiny, "model"), cfg.seed)
    batch_size = 2048  # configs/pythia160m.py's
    command = [sys.executable, "train.py", "configs/pythia160m.py", f"--model_dir={workdir}/model",
               f"--tokens_dir={tiny}/tokens", f"--out_dir={workdir}/run", f"--device={cfg.device}",
               f"--batch_size={batch_size}", f"--total_tokens={steps * batch_size}",
               f"--log_interval={max(1, steps // 5)}", "--ckpt_interval=1000000", *extra]
    print("training run: " + " ".join(command), flush=True)
    t0 = time.time()
    try:
        done = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=cfg.gpu_train_timeout)
    except subprocess.TimeoutExpired as e:  # its output comes back as bytes even with text=True
        log = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        return dict(command=command, error=f"timed out after {cfg.gpu_train_timeout} s", log_tail=log[-3000:])
    if done.returncode != 0:
        return dict(command=command, error=f"train.py exited with {done.returncode}",
                    log_tail=(done.stdout + done.stderr)[-3000:])
    return dict(command=command, **training_figures(done.stdout, time.time() - t0, steps, batch_size))


# -----------------------------------------------------------------------------

def print_table(rows):
    """Each side as median [min-max] tokens/s over the interleaved repeats; "noisy" where the two
    spreads overlap, so the ratio of medians is not a measured difference."""
    spread = lambda v: f"{v[1]:>9,.0f} [{v[0]:,.0f}-{v[2]:,.0f}]"  # noqa: E731
    print(f"\n{'row':<44} {'ours tok/s [min-max]':>30}  {'vs':<50} {'tok/s [min-max]':>30} {'ratio':>7}"
          f"        {'% of limit':>10}")
    for r in rows:
        if "ours_tok_s" not in r:
            print(f"{r['row']:<44} {r.get('note', '')}")
            continue
        vs = (f"{spread(r['vs_spread']):>30} {r['ratio']:>6.2f}x {'noisy' if r['noisy'] else '':<6}" if "vs" in r
              else f"{'-':>30} {'-':>7} {'':<6}")
        limit = f"{r['pct_of_limit']:>9.0f}%" if "pct_of_limit" in r else ""
        print(f"{r['row']:<44} {spread(r['ours_spread']):>30}  {r.get('vs', r.get('note', '')):<50} {vs} {limit}")
    for r in rows:
        if "limit_tok_s" in r:
            print(f"  {r['row']}: {r['gemm_dtype']} GEMM {r['gemm_gflops']:.0f} GFLOP/s, so two GEMMs of 2·B·d·F "
                  f"FLOPs per step allow {r['limit_tok_s']:,.0f} tok/s")


def main(argv):
    cfg = configurator.configure(globals(), argv, __doc__)
    if cfg.gpu_report and not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit(f"bench.py: --gpu_report needs a CUDA GPU and --device=cuda (here device={cfg.device}, "
                         f"torch.cuda.is_available()={torch.cuda.is_available()}); nothing was run")
    t_start = time.time()
    if cfg.gpu_report:
        vars(cfg).update(_GPU)
    if cfg.quick:
        vars(cfg).update(_QUICK)
    cfg.device = model_lib.resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    if cfg.device == "cpu":
        model_lib.keep_freed_memory()  # as train.py runs on a CPU; every row, ours and the references, gets it
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f}")
    transformers = optional("transformers")
    if transformers is not None:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    pythia, gemma, gemma3 = dict(_PYTHIA), dict(_GEMMA, num_hidden_layers=cfg.gemma_layers), dict(_GEMMA3)
    names = ("pythia-160m", f"gemma-2-2b-{cfg.gemma_layers}blocks", "gemma-3-270m")
    if cfg.quick:  # tiny models of the same architectures
        names = ("pythia-tiny", "gemma2-tiny", "gemma3-tiny")
        pythia.update(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
        gemma.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=128, query_pre_attn_scalar=16)
        gemma3.update(vocab_size=512, hidden_size=64, head_dim=16, intermediate_size=128, query_pre_attn_scalar=16,
                      sliding_window=16)  # shorter than ctx_lens, as 512 is than 1024
    wanted = lambda row: cfg.only in row  # noqa: E731
    rows = []
    if wanted(f"harvest {names[0]}"):
        rows += harvest_rows(cfg, transformers, names[0], pythia, cfg.layer, torch.float32, cfg.ctx_lens,
                             cfg.harvest_tokens)
    if cfg.gemma_layers and wanted(f"harvest {names[1]}"):
        rows += harvest_rows(cfg, transformers, names[1], gemma, cfg.gemma_layers - 2,
                             getattr(torch, cfg.gemma_dtype), cfg.ctx_lens[-1:], cfg.gemma_tokens)
    if cfg.gemma3_layer >= 0 and wanted(f"harvest {names[2]}"):
        dtype = model_lib.resolve_dtype(cfg.gemma3_dtype, "gemma3", cfg.device)
        rows += harvest_rows(cfg, transformers, names[2], gemma3, cfg.gemma3_layer, getattr(torch, dtype),
                             cfg.ctx_lens, cfg.gemma_tokens)
    if cfg.gemma3_layer >= 0 and wanted(f"bf16 {names[2]}"):
        rows += bf16_rows(cfg, names[2], gemma3, cfg.gemma3_layer, cfg.ctx_lens, cfg.gemma_tokens)
    if cfg.gemma3_layer >= 0 and wanted(f"cache {names[2]}"):
        dtype = model_lib.resolve_dtype(cfg.gemma3_dtype, "gemma3", cfg.device)
        rows += cache_rows(cfg, names[2], gemma3, cfg.gemma3_layer, dtype, cfg.ctx_lens[0])
    sae_shapes = cfg.sae_shapes if wanted("sae step") else []
    for F, k in sae_shapes[:1]:  # bf16 autocast vs fp32, as sae_autocast would run it here
        rows += sae_rows(cfg, F, k, "bf16")
    for F, k in sae_shapes if cfg.compile else []:
        rows += sae_rows(cfg, F, k, "compiled")
    # only now: importing dictionary_learning imports nnsight, which patches torch so that
    # torch.compile fails afterwards (FakeTensor.__new__ ... 'pytype')
    dictionary_learning = optional("dictionary_learning") if sae_shapes else None
    for F, k in sae_shapes:
        rows += sae_rows(cfg, F, k, "reference" if dictionary_learning else None)
    print_table(rows)
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (2 cores; > 2 means shared)")
    result = dict(settings=vars(cfg), torch=torch.__version__, threads=torch.get_num_threads(),
                  load_average=[load_before[0], load_after[0]], rows=rows)
    if cfg.json_path:
        prepare.write_json(cfg.json_path, result)
        print(f"wrote {cfg.json_path}")
    if cfg.gpu_report:
        with tempfile.TemporaryDirectory() as workdir:
            result["training"] = training_run(cfg, workdir, _PYTHIA, cfg.gpu_train_steps)
        result.update(gpu=torch.cuda.get_device_name(cfg.device), cuda=torch.version.cuda,
                      wall_s=time.time() - t_start)
        prepare.write_json(cfg.gpu_report, result)
        print(f"wrote {cfg.gpu_report}")


if __name__ == "__main__":
    configurator.run(main)
