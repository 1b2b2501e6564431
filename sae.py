"""The sparse autoencoder: Matryoshka BatchTopK (our default) and its relatives BatchTopK, TopK and
ReLU+L1, with everything about it that is not the data pipeline: init, encode/decode, the training
objective, the decoder constraint, the inference threshold, scale folding, save/load, SAELens export.

Section numbers (§) refer to /work/shared/reference/training.md. train.py owns the loop; a step is

    loss, stats, f = sae.training_loss(x / s, dead_mask)        # §1.5-1.10
    loss.backward(); project_decoder_grad(sae)                 # §1.12
    clip, optimizer.step(); normalize_decoder(sae)
    update_threshold(sae, batch_min_positive(f))               # §1.11 (MIN-reduce across ranks first)

and at the end `fold_scale(sae, s); save(sae, out_dir)`; evaluate.py calls `load(out_dir)`.
"""
import json
import math
import os

import torch
import torch.nn as nn
import safetensors.torch

ARCHS = ("matryoshka_batchtopk", "batchtopk", "topk", "relu")
_AUX_ALPHA = 1 / 32  # §1.10: weight of the aux-k loss
_THRESHOLD_BETA = 0.999  # §1.11: EMA decay of the inference threshold


def matryoshka_group_sizes(d_sae, fractions):
    """§1.7: every group but the last gets int(frac * F), the last gets the remainder."""
    sizes = [int(frac * d_sae) for frac in fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    if min(sizes) <= 0:
        raise ValueError(f"group_fractions {fractions} give an empty group for d_sae={d_sae}: {sizes}")
    return sizes


class SAE(nn.Module):

    def __init__(self, d_in, d_sae, arch="matryoshka_batchtopk", k=32,
                 group_fractions=(1/32, 1/16, 1/8, 1/4, 1/2 + 1/32), seed=0, l1_coefficient=0.02, **meta):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown SAE arch '{arch}', expected one of {ARCHS}")
        sizes = matryoshka_group_sizes(d_sae, group_fractions) if arch == "matryoshka_batchtopk" else [d_sae]
        self.cfg = dict(arch=arch, d_in=d_in, d_sae=d_sae, k=None if arch == "relu" else k,
                        group_sizes=sizes, scale=1.0, **meta)
        if arch == "relu":
            self.cfg["l1_coefficient"] = l1_coefficient
        generator = torch.Generator().manual_seed(seed)
        if arch == "relu":  # §2: Gaussian decoder rows rescaled to norm 0.1, tied encoder
            W_dec = torch.randn(d_sae, d_in, generator=generator)
            W_dec *= 0.1 / W_dec.norm(dim=1, keepdim=True)
        else:  # §1.4: kaiming-uniform rows normalised to unit norm, tied encoder
            W_dec = nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), generator=generator)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # tied init, untied training
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # set to the geometric median at step 0 (§1.4)
        self.register_buffer("threshold", torch.tensor(-1.0))  # θ, -1 = unset (§1.11)

    def pre_acts(self, x):
        """a = ReLU((x - b_dec) W_enc + b_enc) (§1.5); the ReLU arch has no pre-encoder bias (§2)."""
        x = x.to(self.W_enc.dtype)  # e.g. Gemma's bf16 residual: the SAE stays fp32 (paper.md #16)
        if self.cfg["arch"] != "relu":
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def select(self, a):
        """Training-time sparsity of a (N, F): the flat indices and values of the kept entries.
        BatchTopK keeps the k*N largest entries of the whole batch (§1.6), TopK k per token (§2)."""
        n, d_sae = a.shape
        k = self.cfg["k"]
        if self.cfg["arch"] == "topk":
            vals, cols = a.topk(k, dim=-1, sorted=False)
            rows = torch.arange(n, device=a.device).unsqueeze(1)
            return (rows * d_sae + cols).flatten(), vals.flatten()
        vals, idx = a.flatten().topk(k * n, sorted=False)
        return idx, vals

    def encode(self, x):
        """Inference latents for x of any shape (..., d_in)."""
        a = self.pre_acts(x)
        if self.cfg["arch"] == "relu":
            return a
        if self.cfg["arch"] == "topk" or self.threshold < 0:
            # TopK is per token anyway. For BatchTopK an unset θ (first 1000 steps, §1.11) falls back
            # to batch top-k over the tokens given here, which makes a token's latents batch-dependent.
            flat = a.reshape(-1, a.shape[-1])
            idx, vals = self.select(flat)
            return torch.zeros_like(flat).flatten().scatter(0, idx, vals).view_as(a)
        return a * (a > self.threshold)  # §1.14: batch-independent, JumpReLU-like

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x))

    def _decode_prefixes(self, f):
        """§1.7: x̂_0 = b_dec, x̂_i = x̂_{i-1} + f[:, g_i] W_dec[g_i]. One entry per group."""
        x_hat, prefixes, start = self.b_dec, [], 0
        for size in self.cfg["group_sizes"]:
            x_hat = x_hat + f[:, start:start + size] @ self.W_dec[start:start + size]
            prefixes.append(x_hat)
            start += size
        return prefixes

    def _decode_prefixes_sparse(self, idx, vals, n):
        """Same as _decode_prefixes, from the k*N kept entries only: embedding_bag sums the selected
        decoder rows weighted by their activations, without the dense (N, F) @ (F, d) product."""
        idx, order = idx.sort()  # embedding_bag wants each token's entries contiguous
        vals, d_sae = vals[order], self.cfg["d_sae"]
        rows, cols = idx // d_sae, idx % d_sae
        offsets = torch.searchsorted(rows, torch.arange(n, device=idx.device))
        x_hat, prefixes, start = self.b_dec, [], 0
        for size in self.cfg["group_sizes"]:
            in_group = (cols >= start) & (cols < start + size)
            x_hat = x_hat + nn.functional.embedding_bag(cols, self.W_dec, offsets, mode="sum",
                                                        per_sample_weights=(vals * in_group).to(self.W_dec.dtype))
            prefixes.append(x_hat)
            start += size
        return prefixes

    def training_loss(self, x, dead_mask=None, l1_scale=1.0, sparse_decode=False):
        """The training objective on x (B, d_in) (already divided by the scale s, §1.3).
        Returns (loss, stats, f). stats: detached tensors loss, rec (full-width MSE), aux,
        prefix_losses (G,), l0 (+ l1 for ReLU); nothing here syncs with the host, so train.py
        decides when to call .item().

        dead_mask (F,) bool: latents dead by the 10M-token rule (§1.9). None skips aux-k entirely;
        a tensor always computes it and zeroes it with torch.where when no latent is dead, so
        there is no data-dependent branch under torch.compile (pass None while nothing can be dead).
        l1_scale: the ReLU arch's L1 warm-up factor min(t/T_sw, 1) (§2); a 0-d tensor avoids
        recompiles under torch.compile. sparse_decode: decode via _decode_prefixes_sparse."""
        a = self.pre_acts(x)
        if self.cfg["arch"] == "relu":  # §2: MSE + λ·mean_b Σ_i f_i ||W_dec,i||
            rec = (x - self.decode(a)).pow(2).sum(-1).mean()
            l1 = (a * self.W_dec.norm(dim=1)).sum(-1).mean()
            loss = rec + self.cfg["l1_coefficient"] * l1_scale * l1
            stats = dict(loss=loss, rec=rec, aux=torch.zeros((), device=x.device), l1=l1,
                         prefix_losses=rec.reshape(1), l0=(a > 0).sum(-1).float().mean())
            return loss, {key: t.detach() for key, t in stats.items()}, a

        idx, vals = self.select(a)
        f = torch.zeros_like(a).flatten().scatter(0, idx, vals).view_as(a)
        prefixes = (self._decode_prefixes_sparse(idx, vals, len(x)) if sparse_decode
                    else self._decode_prefixes(f))
        # §1.8: L_i = mean_b Σ_d (x - x̂_i)²; L_rec = (1/G) Σ_i w_i L_i with w_i = 1/G. The resulting
        # 1/G² scale is dictionary_learning's quirk; kept for parity (it matters only relative to
        # the aux term and grad clipping). G = 1 for BatchTopK/TopK, so L_rec = plain MSE there.
        prefix_losses = torch.stack([(x - x_hat).pow(2).sum(-1).mean() for x_hat in prefixes])
        num_groups = len(prefixes)
        rec = (prefix_losses / num_groups).mean()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None:
            aux = self._aux_loss(x - prefixes[-1], a, dead_mask)
        loss = rec + _AUX_ALPHA * aux
        stats = dict(loss=loss, rec=prefix_losses[-1], aux=aux, prefix_losses=prefix_losses,
                     l0=(f > 0).sum(-1).float().mean())
        return loss, {key: t.detach() for key, t in stats.items()}, f

    def _aux_loss(self, residual, a, dead_mask):
        """§1.10 aux-k (arXiv:2406.04093): reconstruct the detached residual from the top
        k_aux = min(d/2, n_dead) post-ReLU activations of dead latents, decoded without b_dec,
        normalised by the residual's variance. Selecting a fixed d/2 entries with the live ones
        set to -1 and then dropping those gives min(d/2, n_dead) without knowing n_dead on the host."""
        residual = residual.detach()
        k_aux = min(self.cfg["d_in"] // 2, self.cfg["d_sae"])
        vals, cols = torch.where(dead_mask, a, -1.0).topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(a).scatter(-1, cols, vals.clamp(min=0))
        error = (residual - acts @ self.W_dec).pow(2).sum(-1).mean()
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        aux = torch.nan_to_num(error / variance, nan=0.0)
        return torch.where(dead_mask.any(), aux, 0.0)


@torch.no_grad()
def geometric_median(x, max_iter=100, tol=1e-5):
    """Weiszfeld's algorithm in fp64 (§1.4): the point minimising Σ_i ||x_i - y||, started at the
    mean. Used once at step 0 for b_dec; robust to outlier tokens, unlike the mean."""
    points = x.reshape(-1, x.shape[-1]).double()
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1 / (points - median).norm(dim=1).clamp(min=1e-12)  # clamp: a point may coincide
        new_median = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (new_median - median).norm()
        median = new_median
        if moved < tol:
            break
    return median.to(x.dtype)


@torch.no_grad()
def project_decoder_grad(sae):
    """§1.12: g_i ← g_i - (g_i·w_i) w_i, so the step moves each unit-norm row along its sphere.
    The ReLU arch has no decoder constraint (§2)."""
    if sae.cfg["arch"] == "relu" or sae.W_dec.grad is None:
        return
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    sae.W_dec.grad -= (sae.W_dec.grad * rows).sum(1, keepdim=True) * rows


@torch.no_grad()
def normalize_decoder(sae):
    """§1.12: renormalise the decoder rows to unit norm after the optimizer step (not ReLU, §2)."""
    if sae.cfg["arch"] != "relu":
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


@torch.no_grad()
def batch_min_positive(f):
    """§1.11: the smallest positive entry of f, 0 if there is none (0-d fp32, no host sync)."""
    f = f.float()
    smallest = torch.where(f > 0, f, math.inf).min()
    return torch.where(torch.isinf(smallest), 0.0, smallest)


@torch.no_grad()
def update_threshold(sae, m):
    """§1.11: θ ← m if θ is unset (< 0), else θ ← 0.999 θ + 0.001 m; fp32 with autocast off."""
    with torch.autocast(sae.threshold.device.type, enabled=False):
        theta, m = sae.threshold, torch.as_tensor(m, device=sae.threshold.device).float()
        theta.copy_(torch.where(theta < 0, m, _THRESHOLD_BETA * theta + (1 - _THRESHOLD_BETA) * m))


@torch.no_grad()
def fold_scale(sae, s):
    """§1.15: make an SAE trained on x/s run on raw x, in place: b_dec, b_enc, θ times s, weights
    unchanged. Then encode(x) = s·encode_before(x/s) and decode(s·f) = s·decode_before(f).
    ReLU arch (§2): also fold the decoder row norms into W_enc/b_enc so the rows become unit norm
    (its latents then carry those norms). Fold a copy if training continues."""
    if sae.cfg["scale"] != 1.0:
        raise ValueError(f"scale already folded (cfg scale = {sae.cfg['scale']})")
    sae.b_dec *= s
    sae.b_enc *= s
    sae.threshold.copy_(torch.where(sae.threshold < 0, sae.threshold, sae.threshold * s))
    sae.cfg["scale"] = float(s)
    if sae.cfg["arch"] == "relu":
        norms = sae.W_dec.norm(dim=1)
        sae.W_dec /= norms[:, None]
        sae.W_enc *= norms
        sae.b_enc *= norms
    return sae


def _write_atomic(path, data):
    """Write bytes to path + '.tmp', fsync, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(sae):
    return {name: t.detach().cpu().contiguous() for name, t in
            dict(W_enc=sae.W_enc, W_dec=sae.W_dec, b_enc=sae.b_enc, b_dec=sae.b_dec,
                 threshold=sae.threshold).items()}


def save(sae, folder):
    """folder/sae.safetensors + folder/cfg.json, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, "sae.safetensors"), safetensors.torch.save(_tensors(sae)))
    _write_atomic(os.path.join(folder, "cfg.json"), json.dumps(sae.cfg, indent=2).encode())


def load(path, device="cpu"):
    """Load an SAE saved by save(); path is its folder or its sae.safetensors file. The arch is
    read from cfg.json and never defaulted, so a TopK SAE cannot load as ReLU (SAELens#308)."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights_path = path if path.endswith(".safetensors") else os.path.join(folder, "sae.safetensors")
    cfg_path = os.path.join(folder, "cfg.json")
    for p in (weights_path, cfg_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no SAE file at {p}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    for key in ("arch", "d_in", "d_sae", "k", "group_sizes", "scale"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing key '{key}'")
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"{cfg_path}: unknown arch '{cfg['arch']}', expected one of {ARCHS}")
    if cfg["arch"] != "relu" and not (isinstance(cfg["k"], int) and cfg["k"] > 0):
        raise ValueError(f"{cfg_path}: arch '{cfg['arch']}' needs a positive integer k, got {cfg['k']!r}")
    if sum(cfg["group_sizes"]) != cfg["d_sae"] or min(cfg["group_sizes"]) <= 0:
        raise ValueError(f"{cfg_path}: group_sizes {cfg['group_sizes']} do not split d_sae={cfg['d_sae']}")
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    sae = SAE(cfg["d_in"], cfg["d_sae"], arch=cfg["arch"], k=cfg["k"])
    sae.cfg = cfg
    expected = {name: t.shape for name, t in _tensors(sae).items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights_path}: missing tensor '{name}'")
        if tensors[name].shape != shape:
            raise ValueError(f"{weights_path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                             f"cfg.json (d_in={cfg['d_in']}, d_sae={cfg['d_sae']}) implies {tuple(shape)}")
    for name in tensors.keys() - expected.keys():
        raise ValueError(f"{weights_path}: unexpected tensor '{name}'")
    sae.load_state_dict(tensors)
    return sae.to(device)


def export_saelens(sae, folder):
    """Write folder/cfg.json + folder/sae_weights.safetensors as a SAELens JumpReLU SAE computing
    exactly our encode on raw activations. SAELens's JumpReLU encode is
        h = (x - b_dec·apply_b_dec_to_input) W_enc + b_enc;  f = ReLU(h) · [h > ReLU(threshold)]
    which for θ ≥ 0 equals our a·[a > θ] with a = ReLU(h): the scalar θ becomes a per-latent
    vector. The ReLU arch has no pre-encoder bias, so apply_b_dec_to_input=False and θ = 0.
    TopK cannot be written as a fixed per-latent threshold."""
    arch = sae.cfg["arch"]
    if arch == "topk":
        raise ValueError("a TopK SAE cannot be exported as JumpReLU: its per-token top-k is not a threshold")
    if arch != "relu" and sae.threshold < 0:
        raise ValueError("the SAE's inference threshold is unset (θ < 0); train past the threshold warm-up first")
    if "layer" not in sae.cfg:
        raise ValueError("cfg has no 'layer'; SAELens needs it for hook_name blocks.{layer}.hook_resid_post")
    tensors = _tensors(sae)
    tensors["threshold"] = (torch.zeros(sae.cfg["d_sae"]) if arch == "relu" else
                            tensors["threshold"].expand(sae.cfg["d_sae"]).contiguous())
    metadata = dict(model_name=sae.cfg.get("model"), hook_name=f"blocks.{sae.cfg['layer']}.hook_resid_post",
                    hook_head_index=None, prepend_bos=True)
    cfg = dict(architecture="jumprelu", d_in=sae.cfg["d_in"], d_sae=sae.cfg["d_sae"], dtype="float32",
               device="cpu", apply_b_dec_to_input=arch != "relu", normalize_activations="none",
               reshape_activations="none", activation_fn="relu", **metadata, metadata=metadata)
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, "sae_weights.safetensors"), safetensors.torch.save(tensors))
    _write_atomic(os.path.join(folder, "cfg.json"), json.dumps(cfg, indent=2).encode())
