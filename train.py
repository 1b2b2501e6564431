"""
Train sparse autoencoders on residual-stream activations harvested from *masked* text
(arXiv 2604.06495, "Improving Robustness in Sparse Autoencoders via Masked Regularization").

The paper's whole change lives in Harvester.next_acts(): before the LLM forward pass, each
ordinary input token is replaced by `mask_token` with probability `mask_prob` (paper: 0.3), so
the activations come from corrupted contexts and co-occurrence shortcuts break. The SAE objective
is unchanged (Matryoshka BatchTopK by default, sae.py). mask_prob=0 is the baseline.

Run:
  python prepare.py && python train.py          # the default: Gemma 3 270M layer 6, offline, CPU
  python train.py configs/pythia160m.py         # the paper's Pythia-160M run (one GPU)
  python train.py configs/pythia160m.py --mask_prob=0.0 --out_dir=out/pythia160m_p0   # baseline
  torchrun --standalone --nproc_per_node=8 train.py configs/pythia160m.py            # DDP
  python train.py configs/pythia160m.py --resume=True                                 # after a kill

Settings below are the defaults; a config file and --key=value override them (configurator.py).
One run trains one SAE per entry of `ks` from the same harvested stream, since harvesting
dominates the cost; each SAE is written to out_dir/k{k}/ (sae.safetensors + cfg.json), and the
resume state to out_dir/checkpoint/. While a run goes on it holds a lock on out_dir/train.lock, so
a second train.py on the same out_dir stops at once instead of overwriting its files.
"""
import contextlib
import copy
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

import configurator
import model as model_lib
import prepare
import sae as sae_lib

# -----------------------------------------------------------------------------
# data and model
model_dir = "data/gemma-3-270m/model"  # local Hugging Face folder (prepare.py fetches hub models)
tokens_dir = "data/gemma-3-270m/tokens"  # train.bin/val.bin + meta.json from prepare.py
layer = 6                          # hook: residual stream after this block (0-based)
out_dir = "out/gemma3"
# masking: the paper's regulariser (README, choices where the paper is silent: masking)
mask_prob = 0.3                    # probability of replacing an eligible input token
mask_token = "<mask>"              # must be exactly one token id, never BOS/EOS/pad
train_on_masked = True             # keep masked positions in the SAE data (False: an ablation)
mask_replacement = "token"         # "token": mask_token (the paper); "unigram": a token drawn from
                                   # train.bin's unigram distribution (a control: README, the experiment)
# harvesting
ctx_len = 128                      # tokens per LLM row, BOS first (paper: 1024)
llm_batch_rows = 32                # rows per LLM forward pass
buffer_tokens = 65_536             # shuffle buffer; refilled when half has been read
llm_dtype = "auto"                 # float32 | bfloat16 | auto (model.resolve_dtype: bf16 for Gemma on CUDA
                                   # and on CPUs with bf16 matrix units, else fp32; the log says which)
outlier_norm_ratio = 0.0           # drop tokens with norm > ratio x batch median (0 = off)
activation_cache = ""              # folder of harvested activations: the first run writes it, later
                                   # runs with the same harvest settings read it ("" = off; README,
                                   # Activation cache)
# SAE
arch = "matryoshka_batchtopk"      # matryoshka_batchtopk | batchtopk | topk | relu
ks = [20, 80]                      # one SAE per target L0 (paper: 20, 40, 80, 160)
l1_coefficients = [0.02]           # relu arch only: one SAE per L1 coefficient
dict_size = 2048                   # latents F (paper: 4096)
group_fractions = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]  # Matryoshka groups
# optimisation (sae.py §1.12-13)
total_tokens = 307_200             # SAE training tokens (paper: 500M)
batch_size = 1024                  # SAE tokens per step, summed over ranks (paper: 2048)
lr = 3e-4
warmup_steps = 30                  # paper recipe: 1000
decay_start = 0.8                  # linear decay to 0 over the last 20% of steps
grad_clip = 1.0
l1_warmup_steps = 500              # relu arch: L1 coefficient ramps up over these steps
dead_tokens = 6_144                # a latent unseen for this many tokens is dead (paper: 10M); 2% of
                                   # total_tokens, the paper's 10M of 500M: of 2%, 20 steps and the whole
                                   # run, measured, the one that leaves the fewest latents silent on clean
                                   # text and whose count is nearest to them (README, The dead window)
threshold_start = 30               # inference-threshold EMA starts after this step (paper: 1000)
threshold = "calibrated"           # the exported SAE's inference θ: "calibrated" = bisected so that its
                                   # mean L0 on clean held-out tokens is k, for every arm alike; "ema" =
                                   # the training EMA, dictionary_learning's (README, Calibrated thresholds)
calibration_tokens = 16_384        # clean tokens for the calibration: the first ones of val.bin in rows
                                   # of ctx_len; L0 is k on them, θ moved <0.8% from 2,048 to 16,384 (README)
scale_tokens = 16_384              # tokens used to estimate the activation scale
seed = 0                           # the SAE: its init and the shuffle buffer's order
data_seed = 0                      # the data: the masks. Runs differing only in seed share one
                                   # harvested stream, hence one activation_cache (README, Seeds)
# system
device = "auto"                    # auto | cpu | cuda | cuda:N
compile = "auto"                   # torch.compile the SAE loss: auto (= on CUDA) | on | off
sae_autocast = True                # bf16 autocast for the SAE step where the device has bf16 units:
                                   # CUDA, or a CPU with AVX512_BF16/AMX (model.resolve_dtype's test);
                                   # fp32 elsewhere. On a CPU sae.py's sparse step keeps its products
                                   # fp32 under autocast, so today it changes nothing there (README, Speed)
tf32 = True                        # CUDA: fp32 matmuls (a float32 LLM's forward) on TF32 tensor cores,
                                   # ~1e-3 relative error, ~7x the fp32 rate on an H100; False = exact fp32
log_interval = 25
ckpt_interval = 100
resume = False                     # continue from out_dir/checkpoint
wandb_project = ""                 # log to Weights & Biases when set (optional package)

# settings that may change between a checkpoint and its resumption. out_dir: the checkpoint was
# found in it, so it is the run's folder however it is spelled and wherever it has been moved
# activation_cache: the cache holds the same stream the LLM would give, so it may come or go;
# threshold, calibration_tokens: they choose the exports' θ only, never the training (so a checkpoint
# written before they existed resumes too)
_RESUMABLE_CHANGES = {"resume", "log_interval", "ckpt_interval", "compile", "tf32", "wandb_project", "out_dir",
                      "activation_cache", "threshold", "calibration_tokens"}
_FOLDER_SETTINGS = {"model_dir", "tokens_dir"}  # compared as the folders they name, not as strings
# divergence: an explained variance below this at a log step means the reconstruction error is
# 100x the activations' variance; a fresh SAE starts near 0 and a diverging one runs to -1e29
_DIVERGED_EV = -100.0


# -----------------------------------------------------------------------------
# harvesting: token rows -> masked rows -> residual activations

def mask_tokens(rows, eligible, prob, mask_id, generator, unigram_cdf=None):
    """The paper's corruption: i.i.d. Bernoulli(prob) per eligible position (arXiv 2604.06495),
    replaced by mask_id, or with unigram_cdf by a token drawn from the text's unigram distribution.
    The positions are drawn first, so both replacements corrupt the same positions for one seed."""
    draws = torch.rand(rows.shape, generator=generator).to(rows.device)
    masked = (draws < prob) & eligible
    if unigram_cdf is None:
        return torch.where(masked, mask_id, rows), masked
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float64)
    drawn = torch.searchsorted(unigram_cdf, u).clamp(max=len(unigram_cdf) - 1).to(rows.device)
    return torch.where(masked, drawn, rows), masked


def unigram_cdf(tokens, vocab_size, special_ids):
    """The cumulative unigram distribution of a token file over ordinary ids (specials never drawn)."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)[:vocab_size].astype(np.float64)
    counts[list(special_ids)] = 0
    return torch.from_numpy(np.cumsum(counts) / counts.sum())


def mask_generator(data_seed, rank, batch_index):
    """Masks depend on (data_seed, rank, batch) only, so resume, p=0 and the activation cache
    reproduce the stream exactly, and the SAE's `seed` leaves them alone."""
    state = np.random.SeedSequence([data_seed, rank, batch_index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> 1))


class Harvester:
    """Reads rows of the token file in order (rank r takes rows r, r+W, ...), masks and runs the LLM;
    with a cache folder, LLM batch i comes from its chunk file there when one exists, and each
    batch harvested is written there."""

    def __init__(self, m, cfg, mask_id, rank, world, cache=None):
        self.m, self.cfg, self.mask_id, self.rank, self.world = m, cfg, mask_id, rank, world
        self.cache = cache              # this rank's chunk folder (open_cache), or None
        tokens, _ = prepare.open_tokens(cfg.tokens_dir, "train")
        self.n_rows = len(tokens) // (cfg.ctx_len - 1)
        self.unigram_cdf = (unigram_cdf(tokens, m.cfg.vocab_size, m.special_ids)
                            if cfg.mask_replacement == "unigram" else None)
        if self.n_rows < world * cfg.llm_batch_rows:
            raise ValueError(f"{cfg.tokens_dir}/train.bin has {len(tokens)} tokens: too few for "
                             f"{world} x {cfg.llm_batch_rows} rows of {cfg.ctx_len}")
        self.batches_done = 0           # LLM batches this rank has run (the mask RNG's step)
        self.leftover = None            # activations harvested but not yet handed out
        self.tokens_masked = self.tokens_eligible = 0

    def read_rows(self):
        """One LLM batch: BOS + ctx_len-1 tokens of the packed stream per row (documents joined by
        EOS; README, choices where the paper is silent)."""
        tokens, _ = prepare.open_tokens(self.cfg.tokens_dir, "train")  # reopen: memmaps leak
        span = self.cfg.ctx_len - 1
        first = self.batches_done * self.cfg.llm_batch_rows * self.world
        rows = [(first + i * self.world + self.rank) % self.n_rows
                for i in range(self.cfg.llm_batch_rows)]  # wraps around into a new epoch
        batch = np.stack([tokens[r * span:(r + 1) * span] for r in rows]).astype(np.int64)
        bos = np.full((len(rows), 1), self.m.cfg.bos_token_id, dtype=np.int64)
        return torch.from_numpy(np.concatenate([bos, batch], 1)).to(self.m_device)

    @property
    def m_device(self):
        return next(self.m.parameters()).device

    @torch.no_grad()
    def harvest(self):
        """One LLM batch: the activations of its valid positions (n, d) in the LLM's dtype, and
        which of them were masked (n,). All of them, masked or not: what the cache stores."""
        rows = self.read_rows()
        valid = self.m.valid_mask(rows)  # BOS/EOS/pad are never masked and never trained on
        generator = mask_generator(self.cfg.data_seed, self.rank, self.batches_done)
        inputs, masked = mask_tokens(rows, valid, self.cfg.mask_prob, self.mask_id, generator, self.unigram_cdf)
        return self.m.resid_post(inputs, self.cfg.layer)[valid], masked[valid]

    def next_acts(self):
        """Activations of one LLM batch at the hook, special positions dropped, shape (n, d)."""
        cfg = self.cfg
        chunk = self.cache and chunk_path(self.cache, self.batches_done)
        if chunk and os.path.exists(chunk):
            stored, masked = read_chunk(chunk, self.m_device)
        else:
            stored, masked = self.harvest()
        # the filters run on what was stored, so train_on_masked=False and the outlier filter read
        # the same cache, and the stream is the live one bit for bit
        acts = stored if cfg.train_on_masked else stored[~masked]
        if cfg.outlier_norm_ratio > 0:  # optional filter for outlier tokens (sae.py §5.5)
            norms = acts.norm(dim=-1)
            acts = acts[norms <= cfg.outlier_norm_ratio * norms.median()]
        if not torch.isfinite(acts).all():
            raise FloatingPointError(f"non-finite activations at layer {cfg.layer} in LLM batch "
                                     f"{self.batches_done} (rank {self.rank}); check the model/dtype")
        if chunk and not os.path.exists(chunk):
            write_chunk(chunk, stored, masked)
        self.batches_done += 1
        self.tokens_masked += int(masked.sum())
        self.tokens_eligible += len(masked)
        return acts

    def take(self, n):
        """Exactly n activations, harvesting as many LLM batches as needed."""
        chunks, have = [], 0
        if self.leftover is not None:
            chunks, have = [self.leftover], len(self.leftover)
        while have < n:
            chunks.append(self.next_acts())
            have += len(chunks[-1])
        acts = torch.cat(chunks)
        self.leftover = acts[n:].clone()
        return acts[:n]


class ShuffleBuffer:
    """Serves random unread activations; refills the read half when half is gone (sae.py §1.2).

    Tokens of one document are strongly correlated, so batches mix many rows."""

    def __init__(self, harvester, size, device, generator):
        self.harvester, self.generator = harvester, generator
        self.acts = harvester.take(size).to(device)
        self.unread = torch.randperm(size, generator=generator).to(device)

    def next_batch(self, n):
        size = len(self.acts)
        if len(self.unread) <= size // 2:
            read = torch.ones(size, dtype=torch.bool, device=self.acts.device)
            read[self.unread] = False
            slots = read.nonzero().squeeze(1)
            self.acts[slots] = self.harvester.take(len(slots)).to(self.acts.dtype)
            self.unread = torch.randperm(size, generator=self.generator).to(self.acts.device)
        batch, self.unread = self.unread[:n], self.unread[n:]
        return self.acts[batch]


# -----------------------------------------------------------------------------
# the activation cache: activation_cache/{key.json, rank{r}/{i:08d}.safetensors}. Chunk i of rank r
# is that rank's LLM batch i: "acts" (n, d) in the LLM's dtype (bf16 when it ran in bf16; fp32
# stays fp32, as fp16 would change the stream the SAE sees) and "masked" (n,), for every valid
# position. Each chunk is written whole (tmp, fsync, rename), in order, so a killed writer leaves
# a prefix that the next run reads and extends.

def file_identity(path, known=None):
    """A file's size and sha256; the hash is taken from `known` (this file's identity as recorded
    before) while size and mtime are unchanged, so a big file is hashed once, not every run."""
    stat = os.stat(path)
    identity = dict(path=os.path.realpath(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    if known and all(known.get(k) == v for k, v in identity.items()):
        return dict(identity, sha256=known["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return dict(identity, sha256=digest.hexdigest())


def cache_key(cfg, m, mask_id, world, known=None):
    """Everything the harvested stream depends on. Not seed, train_on_masked or outlier_norm_ratio:
    the cache holds all valid positions, and the filters run on reading."""
    known = known or {}
    recorded = {f["path"]: f for f in known.get("model_files", [])}
    files = model_lib.checkpoint_files(cfg.model_dir)[0] + [os.path.join(cfg.model_dir, "config.json")]
    return dict(model_files=[file_identity(f, recorded.get(os.path.realpath(f))) for f in files],
                tokens=file_identity(os.path.join(cfg.tokens_dir, "train.bin"), known.get("tokens")),
                layer=cfg.layer, ctx_len=cfg.ctx_len, llm_batch_rows=cfg.llm_batch_rows,
                mask_prob=cfg.mask_prob, mask_token_id=mask_id, mask_replacement=cfg.mask_replacement,
                data_seed=cfg.data_seed,
                llm_dtype=cfg.llm_dtype, world=world, d_model=m.cfg.d_model)


def _key_fields(key):
    """The key as compared: files by name, size and content; their paths and mtimes only inform."""
    fields = {k: v for k, v in key.items() if k not in ("model_files", "tokens")}
    fields["model files"] = [(os.path.basename(f["path"]), f["size"], f["sha256"]) for f in key["model_files"]]
    fields["tokens train.bin"] = (key["tokens"]["size"], key["tokens"]["sha256"])
    return fields


def open_cache(cfg, m, mask_id, rank, world):
    """This rank's chunk folder in cfg.activation_cache, after checking (rank 0) or writing the
    key. A cache of another harvest is refused with one line naming the fields that differ."""
    path = os.path.join(cfg.activation_cache, "key.json")
    if rank == 0:
        known = None
        if os.path.exists(path):
            with open(path) as f:
                known = json.load(f)
        key = cache_key(cfg, m, mask_id, world, known)
        if known is not None:
            was, now = _key_fields(known), _key_fields(key)
            differ = [k for k in now if was.get(k) != now[k]]
            if differ:
                shown = [k if k.endswith(("files", "train.bin")) else f"{k} (cache {was.get(k)!r}, now {now[k]!r})"
                         for k in differ]
                raise ValueError(f"activation_cache {cfg.activation_cache} holds another harvest: it differs in "
                                 f"{', '.join(shown)}; choose another activation_cache folder or delete this one")
        if key != known:  # new, or its files hashed again (moved or touched): record the new mtimes
            prepare.write_json(path, key)
    if world > 1:
        dist.barrier()
    folder = os.path.join(cfg.activation_cache, f"rank{rank}")
    os.makedirs(folder, exist_ok=True)
    return folder


def chunk_path(folder, batch_index):
    return os.path.join(folder, f"{batch_index:08d}.safetensors")


def write_chunk(path, acts, masked):
    tmp = f"{path}.{os.getpid()}.tmp"  # its own name: runs sharing a cache may write one chunk at once
    try:
        with open(tmp, "wb") as f:
            f.write(save({"acts": acts.contiguous().cpu(), "masked": masked.contiguous().cpu()}))
        prepare._replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"could not write activation cache chunk {path}: {e}. The chunks before it are "
                      f"whole; free space and rerun to extend the cache") from None


def read_chunk(path, device):
    try:
        chunk = load_file(path, device=str(device))
        return chunk["acts"], chunk["masked"]
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"activation cache chunk {path} is unreadable ({e}); delete it and the run "
                         f"harvests that batch again") from None


def check_cache_space(cfg, folder, d, world, log):
    """Print the cache's size on disk (tokens x d x bytes) before writing it, and refuse a disk
    that cannot hold the part not yet written. An estimate: every SAE token once, plus the buffer,
    plus the masked positions that train_on_masked=False reads but drops."""
    local_tokens = cfg.buffer_tokens + cfg.total_tokens // world
    stored = local_tokens / (1 - cfg.mask_prob if not cfg.train_on_masked else 1)
    per_batch = cfg.llm_batch_rows * (cfg.ctx_len - 1)  # at most; EOS positions are not stored
    batches = math.ceil(stored / per_batch) + 1
    nbytes = m_bytes(cfg)
    total = world * batches * per_batch * (d * nbytes + 1)
    have = sum(os.path.getsize(chunk_path(folder, i)) for i in range(batches)
               if os.path.exists(chunk_path(folder, i))) * world
    free = shutil.disk_usage(cfg.activation_cache).free
    log(f"activation cache {cfg.activation_cache}: up to {world * batches * per_batch:,} tokens x {d} x "
        f"{nbytes} bytes ({cfg.llm_dtype}) = {total / 2**30:.2f} GiB, {have / 2**30:.2f} GiB there already, "
        f"{free / 2**30:.1f} GiB free")
    if total - have > free:
        raise OSError(f"activation_cache {cfg.activation_cache}: its disk has {free / 2**30:.1f} GiB free but the "
                      f"cache needs {(total - have) / 2**30:.2f} GiB more; choose a folder on a bigger disk")


# -----------------------------------------------------------------------------
# checkpoints: out_dir/checkpoint/{state.safetensors, rank{r}.safetensors}, swapped in whole

def checkpoint_dir(cfg):
    """The checkpoint to resume from; 'checkpoint.old' covers a kill between the two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(cfg.out_dir, name)
        if os.path.exists(os.path.join(path, "state.safetensors")):
            return path
    return None


def save_checkpoint(cfg, saes, optimizers, dead, scale, step, harvester, buffer, rank, world):
    tmp = os.path.join(cfg.out_dir, "checkpoint.tmp")
    final, old = os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "checkpoint.old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    per_rank = {"buffer.acts": buffer.acts, "buffer.unread": buffer.unread,
                "buffer.generator": buffer.generator.get_state(),
                "harvest.leftover": harvester.leftover}
    rank_meta = {"batches_done": harvester.batches_done, "tokens_masked": harvester.tokens_masked,
                 "tokens_eligible": harvester.tokens_eligible}
    _write(os.path.join(tmp, f"rank{rank}.safetensors"), per_rank, rank_meta)
    if rank == 0:
        tensors = {}
        for i, (sae, opt) in enumerate(zip(saes, optimizers)):
            tensors.update({f"sae{i}.{k}": v for k, v in sae.state_dict().items()})
            tensors[f"sae{i}.dead"] = dead[i]
            for j, state in opt.state_dict()["state"].items():
                tensors.update({f"sae{i}.adam{j}.{k}": v for k, v in state.items()})
        meta = {"step": step, "scale": scale, "world": world, "config": vars(cfg)}
        _write(os.path.join(tmp, "state.safetensors"), tensors, meta)
    if world > 1:
        dist.barrier()
    if rank == 0:  # swap in whole; the previous checkpoint stays until the new one is in place
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def last_good(cfg):
    """Where a failed run's last checkpoint is, for its error message."""
    found = checkpoint_dir(cfg)
    return f"The last good checkpoint is in {found}" if found else "No checkpoint was written yet"


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir for as long as the returned descriptor is open: a second
    train.py on the same folder, which would delete and overwrite this run's files, stops with one
    line. flock on a file in the folder (opened for writing, so it also works on NFS); the OS
    drops the lock when the process ends, even by kill -9."""
    path = os.path.join(out_dir, "train.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(f"{out_dir} is in use by another train.py (it holds {path}): wait for "
                              f"it to finish, or choose another out_dir") from None
    return fd


def _write(path, tensors, meta):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if v is not None}
    try:
        save_file(tensors, path + ".tmp", metadata={"meta": json.dumps(meta)})
        prepare._replace(path + ".tmp", path)  # fsync, and the permissions of any new file (not 0600)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        out_dir = os.path.dirname(os.path.dirname(path))
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # a partial file keeps a full disk full
        previous = checkpoint_dir(SimpleNamespace(out_dir=out_dir))
        raise OSError(f"could not write checkpoint file {path}: {e}. " +
                      (f"The previous checkpoint in {previous} is untouched." if previous else
                       "No earlier checkpoint exists.")) from None


def _read(path):
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        return load_file(path), meta
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"checkpoint file {path} is unreadable ({e}); delete the checkpoint "
                         f"folder to start over") from None


def check_resume_config(cfg, saved):
    def same(key, a, b):
        if key in _FOLDER_SETTINGS and isinstance(a, str):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b
    differ = {k: (saved.get(k), v) for k, v in vars(cfg).items()
              if k not in _RESUMABLE_CHANGES and not same(k, saved.get(k), v)}
    if differ:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"refusing to resume {cfg.out_dir}: the config differs from the "
                         f"checkpoint's:\n{lines}\nStart a new out_dir or restore these settings.")


# -----------------------------------------------------------------------------
# the training step (sae.py §1.8-12)

def lr_at(step, total_steps, cfg):
    """Linear warmup, constant, linear decay to 0 from decay_start * total (sae.py §1.13)."""
    if step < cfg.warmup_steps:  # lr 0 at step 0, as dictionary_learning's LambdaLR gives
        return cfg.lr * step / cfg.warmup_steps  # (trainers/trainer.py v0.1.0 line 155: step / warmup_steps)
    decay_from = int(cfg.decay_start * total_steps)
    if step >= decay_from:
        return cfg.lr * (total_steps - step) / max(1, total_steps - decay_from)
    return cfg.lr


def sae_step(sae, loss_fn, optimizer, dead, x, step, lr, cfg, world, autocast):
    """One training step of one SAE on x, and its bookkeeping: the dead counters `dead` (tokens
    since each latent last fired, §1.9) and the inference threshold (§1.11). Returns the stats."""
    # The latents dead after this batch unless it fires them: training_loss drops those it fires
    # before aux-k, so a latent joins aux-k on the step it reaches dead_tokens and leaves it on the
    # step it fires, as in dictionary_learning (trainers/matryoshka_batch_top_k.py v0.1.0 lines
    # 297-302: the counters take the batch before get_auxiliary_loss reads them). With DDP a rank
    # sees only its own part of the batch firing; the counters below take the whole batch's.
    # None skips aux-k while no latent can be dead yet.
    dead_mask = (dead + cfg.batch_size >= cfg.dead_tokens
                 if (step + 1) * cfg.batch_size >= cfg.dead_tokens else None)
    # the ReLU arch's L1 warm-up (§2), 0 at step 0 (trainers/trainer.py v0.1.0 line 193)
    l1_scale = min(1.0, step / cfg.l1_warmup_steps) if cfg.l1_warmup_steps > 0 else 1.0
    with autocast:
        loss, stats, _ = loss_fn(x, dead_mask, l1_scale)
    loss.backward()
    if world > 1:  # each rank's local batch is part of the global one: average the gradients
        for p in sae.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    sae_lib.project_decoder_grad(sae)  # keep decoder rows on the unit sphere (to first order)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae_lib.normalize_decoder(sae)

    fired = stats["fired"]
    if world > 1:  # a latent is alive if it fired on any rank (sae.py §3)
        fired = fired.int()
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        fired = fired.bool()
    dead += cfg.batch_size
    dead.masked_fill_(fired, 0)  # not dead[fired] = 0: boolean indexing syncs with the GPU
    # the EMA starts after threshold_start, as dictionary_learning's `step > threshold_start_step`
    # (trainers/matryoshka_batch_top_k.py v0.1.0 line 270)
    if step > cfg.threshold_start and cfg.arch in ("batchtopk", "matryoshka_batchtopk"):
        min_act = stats["min_act"]
        if world > 1:
            dist.all_reduce(min_act, op=dist.ReduceOp.MIN)
        sae_lib.update_threshold(sae, min_act)
    return stats


# -----------------------------------------------------------------------------

def main(argv):
    cfg = configurator.configure(globals(), argv, __doc__)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:  # torchrun: one process per device; NCCL on CUDA, gloo on CPU
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu"
    else:
        rank, world = 0, 1
        device = model_lib.resolve_device(cfg.device)
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    try:
        with contextlib.ExitStack() as on_exit:  # releases the out_dir lock however train ends
            train(cfg, device, rank, world, log, on_exit)
    except KeyboardInterrupt:
        log(f"\ninterrupted: {checkpoint_dir(cfg)} holds the last checkpoint; continue with --resume=True"
            if checkpoint_dir(cfg) else "\ninterrupted before the first checkpoint: nothing to resume")
        raise
    finally:
        if ddp:
            dist.destroy_process_group()


def validate(cfg):
    problems = []
    if not 0.0 <= cfg.mask_prob < 1.0:
        problems.append(f"mask_prob must be in [0, 1), got {cfg.mask_prob}")
    if cfg.mask_replacement not in ("token", "unigram"):
        problems.append(f"mask_replacement must be token or unigram, got {cfg.mask_replacement!r}")
    if cfg.arch not in sae_lib.ARCHS:
        problems.append(f"arch must be one of {sae_lib.ARCHS}, got {cfg.arch!r}")
    if cfg.compile not in ("auto", "on", "off"):
        problems.append(f"compile must be auto, on or off, got {cfg.compile!r}")
    if cfg.llm_dtype not in model_lib.LLM_DTYPES:
        problems.append(f"llm_dtype must be one of {model_lib.LLM_DTYPES}, got {cfg.llm_dtype!r}")
    for name in ("ctx_len", "llm_batch_rows", "buffer_tokens", "dict_size", "total_tokens",
                 "batch_size", "log_interval", "ckpt_interval", "scale_tokens"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.ctx_len < 2:
        problems.append("ctx_len must be at least 2 (BOS plus one token)")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        problems.append(f"lr must be a positive finite number, got {cfg.lr}")
    if 0 < cfg.total_tokens < cfg.batch_size:
        problems.append(f"total_tokens ({cfg.total_tokens}) is less than one batch ({cfg.batch_size}): "
                        f"no step would train and the SAEs would be exported untrained")
    sweep = cfg.l1_coefficients if cfg.arch == "relu" else cfg.ks
    if not sweep or any((not isinstance(v, (int, float))) or v <= 0 for v in sweep):
        problems.append(f"{'l1_coefficients' if cfg.arch == 'relu' else 'ks'} must be a "
                        f"non-empty list of positive numbers, got {sweep!r}")
    if cfg.arch != "relu" and any(k > cfg.dict_size for k in cfg.ks):
        problems.append(f"every k must be <= dict_size={cfg.dict_size}, got ks={cfg.ks}")
    if cfg.arch == "matryoshka_batchtopk" and abs(sum(cfg.group_fractions) - 1) > 1e-6:
        problems.append(f"group_fractions must sum to 1 (the last group takes the rest), got "
                        f"{cfg.group_fractions} (sum {sum(cfg.group_fractions):.4g})")
    if cfg.threshold not in ("calibrated", "ema"):
        problems.append(f"threshold must be 'calibrated' or 'ema', got {cfg.threshold!r}")
    if not (type(cfg.calibration_tokens) is int and cfg.calibration_tokens > 0):
        problems.append(f"calibration_tokens must be a positive integer, got {cfg.calibration_tokens!r}")
    if cfg.buffer_tokens < 2 * cfg.batch_size:
        problems.append(f"buffer_tokens ({cfg.buffer_tokens}) must hold at least two batches "
                        f"({2 * cfg.batch_size})")
    if problems:
        raise configurator.ConfigError("bad settings:\n  " + "\n  ".join(problems))


def train(cfg, device, rank, world, log, on_exit):
    t_begin = time.time()
    validate(cfg)
    if cfg.batch_size % world:
        raise configurator.ConfigError(f"batch_size {cfg.batch_size} is not divisible by {world} ranks")
    local_batch = cfg.batch_size // world
    total_steps = cfg.total_tokens // cfg.batch_size
    log("settings:\n" + "\n".join(f"  {k} = {v!r}" for k, v in vars(cfg).items()))

    # --- model, tokenizer, mask token: everything checked before anything is written
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # for the whole run: harvest and SAE step alike
    if torch.device(device).type == "cpu":
        model_lib.keep_freed_memory()
    # auto is resolved once, here: the checkpoint records, and --resume compares, the dtype that ran
    cfg.llm_dtype = model_lib.resolve_dtype(cfg.llm_dtype, model_lib.read_config(cfg.model_dir).arch, device)
    log(f"llm_dtype: {cfg.llm_dtype}")
    m = model_lib.load(cfg.model_dir, device, cfg.llm_dtype)
    if not 0 <= cfg.layer < m.cfg.n_layer:
        raise ValueError(f"layer {cfg.layer} is out of range: {cfg.model_dir} has {m.cfg.n_layer} "
                         f"blocks (0..{m.cfg.n_layer - 1})")
    broken = [name for name, p in m.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise ValueError(f"{cfg.model_dir}: non-finite weights (NaN or inf) in {', '.join(broken[:3])}"
                         f"{' ...' if len(broken) > 3 else ''}: the checkpoint is damaged; fetch it again")
    mask_id = prepare.single_token_id(prepare.load_tokenizer(cfg.model_dir), cfg.mask_token)
    if mask_id in m.special_ids or mask_id >= m.cfg.vocab_size:
        raise ValueError(f"mask_token {cfg.mask_token!r} (id {mask_id}) must be an ordinary id below "
                         f"{m.cfg.vocab_size}, not one of the special ids {m.special_ids}")
    tokens, meta = prepare.open_tokens(cfg.tokens_dir, "train")
    if meta["vocab_size"] > m.cfg.vocab_size:
        raise ValueError(f"{cfg.tokens_dir} was tokenized with vocab {meta['vocab_size']}, more than "
                         f"the model's {m.cfg.vocab_size}: tokens and model do not match")
    tokenizer_sha256 = prepare.tokenizer_sha256_of(cfg.model_dir)
    if meta.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise ValueError(f"{cfg.tokens_dir} was not tokenized with {cfg.model_dir}/tokenizer.json (meta.json's "
                         f"tokenizer_sha256 differs): rerun prepare.py for this model, or pass the matching tokens_dir")
    if meta["eos_token_id"] != m.cfg.eos_token_id:
        raise ValueError(f"{cfg.tokens_dir}/meta.json has eos id {meta['eos_token_id']} but "
                         f"{cfg.model_dir} has {m.cfg.eos_token_id}: tokens made with another tokenizer")
    largest = int(tokens.max()) if len(tokens) else 0  # one pass over the file, not hours into the run
    if largest >= m.cfg.vocab_size:
        raise ValueError(f"{cfg.tokens_dir}/train.bin holds token id {largest}, but token ids must be in "
                         f"[0, {m.cfg.vocab_size}) for {cfg.model_dir}: rerun prepare.py for this model")
    del tokens
    max_positions = model_lib.read_json_object(os.path.join(cfg.model_dir, "config.json")).get("max_position_embeddings")
    if max_positions and cfg.ctx_len > max_positions:
        raise ValueError(f"ctx_len={cfg.ctx_len} is longer than {cfg.model_dir}'s max_position_embeddings="
                         f"{max_positions}: positions beyond it were never trained; use ctx_len <= {max_positions}")
    if total_steps < max(cfg.warmup_steps, cfg.threshold_start + 1):
        log(f"warning: only {total_steps} steps: the lr warms up over {cfg.warmup_steps} steps and the "
            f"inference threshold starts after step {cfg.threshold_start}; raise total_tokens for a real run")
    if cfg.resume and checkpoint_dir(cfg) is None:
        raise FileNotFoundError(f"resume=True but {cfg.out_dir}/checkpoint does not exist")

    # the activation cache's key next (a cache of another harvest is bad input), then its size
    cache = open_cache(cfg, m, mask_id, rank, world) if cfg.activation_cache else None
    if cache and rank == 0:
        check_cache_space(cfg, cache, m.cfg.d_model, world, log)
    check_memory(cfg, m.cfg.d_model, local_batch, device, log)

    # every input checked but the checkpoint, which needs the lock first: the first thing written
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:  # before reading a checkpoint that another run could be swapping
        on_exit.callback(os.close, lock_out_dir(cfg.out_dir))
    resume_from = checkpoint_dir(cfg) if cfg.resume else None
    if not cfg.resume and checkpoint_dir(cfg) is not None:
        raise FileExistsError(f"{cfg.out_dir} already holds a checkpoint: pass --resume=True to "
                              f"continue it, or choose another out_dir")
    if resume_from:
        state, meta_state = _read(os.path.join(resume_from, "state.safetensors"))
        check_resume_config(cfg, meta_state["config"])
        if meta_state["world"] != world:
            raise ValueError(f"checkpoint was written by {meta_state['world']} ranks, now {world}")

    # --- data: harvester (from the activation cache where it has the batch) + shuffle buffer (per
    # rank), activation scale
    d = m.cfg.d_model
    harvester = Harvester(m, cfg, mask_id, rank, world, cache)
    buffer_generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    t0 = time.time()
    log(f"filling the shuffle buffer: {cfg.buffer_tokens} tokens x {d} dims "
        f"({cfg.buffer_tokens * d * m_bytes(cfg) / 2**20:.0f} MiB per rank)")
    buffer = ShuffleBuffer(harvester, cfg.buffer_tokens, device, buffer_generator)
    log(f"buffer filled in {time.time() - t0:.1f}s")
    if resume_from:
        rank_state, rank_meta = _read(os.path.join(resume_from, f"rank{rank}.safetensors"))
        buffer.acts = rank_state["buffer.acts"].to(device)
        buffer.unread = rank_state["buffer.unread"].to(device)
        buffer.generator.set_state(rank_state["buffer.generator"])
        harvester.leftover = rank_state.get("harvest.leftover")
        harvester.leftover = None if harvester.leftover is None else harvester.leftover.to(device)
        harvester.batches_done = rank_meta["batches_done"]
        harvester.tokens_masked = rank_meta["tokens_masked"]
        harvester.tokens_eligible = rank_meta["tokens_eligible"]
        scale, start_step = meta_state["scale"], meta_state["step"]
    else:
        # one scalar s with E||x/s||^2 = 1 (sae.py §1.3), from the first buffer, all ranks
        sample = buffer.acts[: cfg.scale_tokens].float()
        mean_sq = sample.pow(2).sum(-1).mean()
        if world > 1:
            dist.all_reduce(mean_sq)
            mean_sq /= world
        scale, start_step = math.sqrt(mean_sq.item()), 0

    # --- SAEs: one per k (or per L1 coefficient), same data
    sweep = cfg.l1_coefficients if cfg.arch == "relu" else cfg.ks
    names = [f"l1_{v:g}" if cfg.arch == "relu" else f"k{v}" for v in sweep]
    meta_cfg = dict(model=cfg.model_dir, model_name=prepare.read_model_source(cfg.model_dir).get("model_name"),
                    tokens_dir=cfg.tokens_dir, layer=cfg.layer, hook=f"blocks.{cfg.layer}.hook_resid_post",
                    mask_prob=cfg.mask_prob, mask_token=cfg.mask_token, mask_replacement=cfg.mask_replacement,
                    data_seed=cfg.data_seed,
                    train_on_masked=cfg.train_on_masked, training_tokens=cfg.total_tokens)
    saes = []
    for v in sweep:
        extra = dict(l1_coefficient=float(v)) if cfg.arch == "relu" else {}
        saes.append(sae_lib.SAE(d, cfg.dict_size, arch=cfg.arch, k=int(v) if cfg.arch != "relu" else 0,
                                group_fractions=tuple(cfg.group_fractions), seed=cfg.seed,
                                **extra, **meta_cfg).to(device))
    # fused: one kernel for the whole update instead of a pass per operation (CUDA and CPU alike)
    optimizers = [torch.optim.Adam(s.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True) for s in saes]
    dead = [torch.zeros(cfg.dict_size, dtype=torch.long, device=device) for _ in saes]
    if resume_from:
        for i, (s, opt) in enumerate(zip(saes, optimizers)):
            s.load_state_dict({k[len(f"sae{i}."):]: v for k, v in state.items()
                               if k.startswith(f"sae{i}.") and k[len(f"sae{i}."):] in s.state_dict()})
            dead[i] = state[f"sae{i}.dead"].to(device)
            opt_state = opt.state_dict()
            for j, param in enumerate(s.parameters()):
                prefix = f"sae{i}.adam{j}."
                # moments in their parameter's memory layout (W_enc is stored transposed): fused
                # Adam needs the same strides (pytorch#106951); on CPU a mismatch silently pairs
                # the wrong elements
                entry = {k[len(prefix):]: torch.empty_like(param).copy_(v) if v.dim() else v
                         for k, v in state.items() if k.startswith(prefix)}
                if entry:
                    opt_state["state"][j] = entry
            opt.load_state_dict(opt_state)
        log(f"resumed {resume_from} at step {start_step}")
    else:
        first = buffer.next_batch(local_batch).float() / scale
        median = sae_lib.geometric_median(first)  # b_dec init (sae.py §1.4)
        if world > 1:
            dist.broadcast(median, 0)
        for s in saes:
            s.b_dec.data.copy_(median)

    # the clean held-out tokens every export calibrates its θ on: harvested once, kept in memory
    clean = None
    if rank == 0 and cfg.arch in ("batchtopk", "matryoshka_batchtopk"):
        t0 = time.time()
        clean = calibration_acts(m, cfg)
        log(f"calibration tokens: {len(clean):,} clean ones from {cfg.tokens_dir}/val.bin in {time.time() - t0:.1f}s "
            f"(threshold = {cfg.threshold!r})")

    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.startswith("cuda"))
    loss_fns = [torch.compile(s.training_loss) if use_compile else s.training_loss for s in saes]
    autocast = sae_autocast_context(device, cfg.sae_autocast)
    wandb = None
    if cfg.wandb_project and rank == 0:
        import wandb  # optional, only when asked for
        wandb.init(project=cfg.wandb_project, config=vars(cfg))

    log(f"training {len(saes)} SAE(s) {names} for {total_steps} steps of {cfg.batch_size} tokens "
        f"(scale s = {scale:.4g}, compile {'on' if use_compile else 'off'}, {world} rank(s))")
    t_loop = t_log = time.time()
    harvest_time_log = 0.0
    for step in range(start_step, total_steps):
        t_batch = time.time()
        batches_before = harvester.batches_done
        try:
            x = buffer.next_batch(local_batch).float() / scale
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step + 1}: {e}. {last_good(cfg)}") from None
        harvested = (harvester.batches_done - batches_before) > 0
        if harvested and device.startswith("cuda"):
            torch.cuda.synchronize()
        harvest_time_log += (time.time() - t_batch) if harvested else 0.0
        lr_now = lr_at(step, total_steps, cfg)
        last_stats = []
        for s, fn, opt, dd in zip(saes, loss_fns, optimizers, dead):
            stats = sae_step(s, fn, opt, dd, x, step, lr_now, cfg, world, autocast)
            last_stats.append(stats)

        if (step + 1) % cfg.log_interval == 0 or step + 1 == total_steps:
            elapsed = time.time() - t_log
            total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
            tokens = cfg.log_interval * cfg.batch_size
            parts = []
            for name, stats, dd in zip(names, last_stats, dead):
                loss = stats["loss"].item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {step + 1}: SAE {name} loss is {loss}; lower lr. {last_good(cfg)}")
                ev = 1 - stats["rec"].item() / total_var.item()
                if ev < _DIVERGED_EV:
                    raise FloatingPointError(f"step {step + 1}: SAE {name} diverged (loss {loss:.3g}, explained "
                                             f"variance {ev:.3g} < {_DIVERGED_EV}); lower lr. {last_good(cfg)}")
                parts.append(f"{name} loss {loss:.4f} aux {stats['aux'].item():.3f} "
                             f"L0 {stats['l0'].item():.1f} EV {ev:.3f} dead {int((dd >= cfg.dead_tokens).sum())} "
                             f"(>{cfg.dead_tokens} tok)")
            # the buffer may not have been refilled in this interval: no harvest rate to show then
            harvest_rate = f"{tokens / harvest_time_log / 1e3:.1f}k tok/s" if harvest_time_log else "—"
            sae_rate = tokens / max(elapsed - harvest_time_log, 1e-9)
            # from the mean step since this process started: one interval's rate jumps with the
            # buffer refills (harvesting) and checkpoints that happen to fall in it
            eta = (total_steps - step - 1) * (time.time() - t_loop) / (step + 1 - start_step)
            log(f"step {step + 1}/{total_steps} | " + " | ".join(parts) +
                f" | lr {lr_now:.2e} | harvest {harvest_rate}, "
                f"sae {sae_rate / 1e3:.1f}k tok/s | eta {eta / 60:.1f} min")
            if wandb:
                wandb.log({f"{n}/{k}": v.item() for n, st in zip(names, last_stats)
                           for k, v in st.items() if v.dim() == 0} | {"lr": lr_now}, step=step + 1)
            t_log, harvest_time_log = time.time(), 0.0

        if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == total_steps:
            for name, s in zip(names, saes):
                if not all(torch.isfinite(p).all() for p in s.parameters()):
                    raise FloatingPointError(f"step {step + 1}: SAE {name} has non-finite weights; "
                                             f"not saving. {last_good(cfg)}")
            save_checkpoint(cfg, saes, optimizers, dead, scale, step + 1, harvester, buffer, rank, world)
            if rank == 0 and step + 1 < total_steps:  # the last state's exports follow the loop
                for name, s in zip(names, saes):
                    export_sae(s, scale, os.path.join(cfg.out_dir, name), cfg, clean)
    # the exports of the last state, also when a resumed run finds its checkpoint at the last step
    # already: a run killed between that checkpoint and these exports would otherwise keep stale ones
    if rank == 0:
        for name, s in zip(names, saes):
            info = export_sae(s, scale, os.path.join(cfg.out_dir, name), cfg, clean)
            if info:
                ema = (f"EMA θ {info['threshold_ema']:.4g} gives L0 {info['calibration_l0_ema']:.2f}"
                       if info["calibration_l0_ema"] is not None else "EMA θ unset")
                log(f"{name}: on {info['calibration_tokens']:,} clean val tokens {ema}, calibrated θ "
                    f"{info['threshold_calibrated']:.4g} gives L0 {info['calibration_l0']:.2f} (k {s.cfg['k']}); "
                    f"exported with the {cfg.threshold} one")

    if harvester.tokens_eligible:
        log(f"realised mask fraction over eligible tokens: "
            f"{harvester.tokens_masked / harvester.tokens_eligible:.4f} (mask_prob {cfg.mask_prob})")
    log(f"done in {(time.time() - t_begin) / 60:.1f} min: SAEs in "
        f"{', '.join(os.path.join(cfg.out_dir, n) for n in names)}")


def sae_autocast_context(device, enabled):
    """bf16 autocast for the SAE step where the device has bf16 units, else fp32. The test is
    llm_dtype=auto's (model.resolve_dtype): bf16 for Gemma means the device runs bf16 natively
    (CUDA, or a CPU with AVX512_BF16/AMX); without those units a bf16 GEMM is emulated, here 0.22
    against 17 GFLOP/s in fp32 (README, Speed)."""
    kind = torch.device(device).type
    native = model_lib.resolve_dtype("auto", "gemma3", device) == "bfloat16"
    return torch.autocast(kind, torch.bfloat16, enabled=bool(enabled) and native)


@torch.no_grad()
def calibration_acts(m, cfg):
    """The clean held-out activations the inference threshold is calibrated on: tokens_dir/val.bin
    read from its start in rows of BOS + ctx_len-1 tokens, never masked, BOS/EOS/pad dropped, the
    first calibration_tokens valid positions, fp32 on the CPU. A fixed selection, so every arm and
    seed (and a resumed run) calibrates on the same tokens. Fewer when val.bin is shorter (a note)."""
    val, _ = prepare.open_tokens(cfg.tokens_dir, "val")
    span = cfg.ctx_len - 1
    device = next(m.parameters()).device
    chunks, have, row = [], 0, 0
    while have < cfg.calibration_tokens and (row + 1) * span <= len(val):
        batch = np.stack([val[r * span:(r + 1) * span] for r in range(row, min(row + cfg.llm_batch_rows,
                                                                               len(val) // span))])
        row += len(batch)
        idx = torch.from_numpy(np.concatenate([np.full((len(batch), 1), m.cfg.bos_token_id),
                                               batch.astype(np.int64)], 1)).to(device)
        chunks.append(m.resid_post(idx, cfg.layer)[m.valid_mask(idx)].float().cpu())
        have += len(chunks[-1])
    if not have:
        raise ValueError(f"{cfg.tokens_dir}/val.bin has {len(val)} tokens, fewer than one row of {cfg.ctx_len}: "
                         f"the inference threshold needs held-out tokens (prepare.py's val_fraction)")
    if have < cfg.calibration_tokens:
        print(f"note: {cfg.tokens_dir}/val.bin gives {have:,} valid tokens, fewer than calibration_tokens="
              f"{cfg.calibration_tokens:,}: the threshold is calibrated on them all")
    return torch.cat(chunks)[:cfg.calibration_tokens]


def m_bytes(cfg):
    return 2 if cfg.llm_dtype == "bfloat16" else 4


def check_memory(cfg, d, local_batch, device, log):
    """Print what the run will hold in memory and refuse one that cannot fit, before the buffer is
    filled: the shuffle buffer (buffer_tokens x d in the LLM's dtype) and, per SAE, its fp32
    weights with their gradients and Adam's two moments (4 x 2·d·F) and about five (B, F) fp32
    tensors of the step (pre-activations, their gradient, the top-k and aux-k selections). The
    LLM's own weights and activations come on top. An estimate, not a bound."""
    n_saes = len(cfg.l1_coefficients if cfg.arch == "relu" else cfg.ks)
    buffer = cfg.buffer_tokens * d * m_bytes(cfg)
    per_sae = 4 * 2 * d * cfg.dict_size * 4 + 5 * local_batch * cfg.dict_size * 4
    need = buffer + n_saes * per_sae
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        try:  # MemAvailable counts the page cache the kernel can give back
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            free = None
    log(f"memory: about {need / 2**30:.2f} GiB (buffer {buffer / 2**30:.2f}, {n_saes} SAE(s) x "
        f"{per_sae / 2**30:.2f}) besides the LLM" + (f"; {free / 2**30:.1f} GiB available" if free else ""))
    if free is not None and need > free:
        raise configurator.ConfigError(
            f"the run needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is available on {device}: "
            f"lower batch_size ({cfg.batch_size}), buffer_tokens ({cfg.buffer_tokens}) or dict_size ({cfg.dict_size})")


def export_sae(s, scale, folder, cfg=None, clean=None):
    """Save a copy with the activation scale folded in, so it runs on raw activations. A BatchTopK
    SAE's folded copy is calibrated on the raw clean activations `clean` (calibration_acts): its
    cfg.json records both thresholds and the L0 each gives there, and cfg.threshold picks the one
    it uses. Returns those cfg.json entries ({} when there is nothing to calibrate)."""
    folded = copy.deepcopy(s).cpu()
    sae_lib.fold_scale(folded, scale)
    info = {}
    if clean is not None and folded.cfg["arch"] in ("batchtopk", "matryoshka_batchtopk"):
        ema = float(folded.threshold)
        theta, l0 = sae_lib.calibrate_threshold(folded, clean, folded.cfg["k"])
        info = dict(threshold_ema=ema if ema >= 0 else None, threshold_calibrated=theta, threshold_used=cfg.threshold,
                    calibration_tokens=len(clean), calibration_l0=l0,
                    calibration_l0_ema=clean_l0(folded, clean, ema) if ema >= 0 else None)
        if cfg.threshold == "calibrated":
            folded.threshold.fill_(theta)
        folded.cfg.update(info)
    sae_lib.save(folded, folder)
    return info


@torch.no_grad()
def clean_l0(sae, x, theta, batch_tokens=4096):
    """Mean L0 that threshold theta gives sae on x (N, d)."""
    return sum(int((sae.pre_acts(c) > theta).sum()) for c in x.split(batch_tokens)) / len(x)


if __name__ == "__main__":
    configurator.run(main)
