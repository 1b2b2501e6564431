"""The sparse autoencoder: Matryoshka BatchTopK (our default) and its relatives BatchTopK, TopK and
ReLU+L1, with everything about it that is not the data pipeline: init, encode/decode, the training
objective, the decoder constraint, the inference threshold, scale folding, save/load, SAELens export.

The § marks name the steps of dictionary_learning's Matryoshka BatchTopK recipe, used in train.py
too: §1.2 shuffle buffer, §1.3 activation scale, §1.4 init, §1.5 encoder, §1.6 batch top-k, §1.7
Matryoshka groups, §1.8 prefix losses, §1.9 dead latents, §1.10 aux-k, §1.11 inference threshold,
§1.12 decoder-gradient projection, §1.13 learning-rate schedule, §1.14 inference; §2 the ReLU+L1
and TopK relatives; §3 DDP; §5 optional filters. train.py owns the loop; a step is

    loss, stats, _ = sae.training_loss(x / s, dead_mask)        # §1.5-1.10
    loss.backward(); project_decoder_grad(sae)                 # §1.12
    clip, optimizer.step(); normalize_decoder(sae)
    dead counters from stats["fired"]                          # §1.9 (OR-reduce across ranks first)
    update_threshold(sae, stats["min_act"])                    # §1.11 (MIN-reduce across ranks first)

and at the end `fold_scale(sae, s); save(sae, out_dir)`; evaluate.py calls `load(out_dir)`.
"""
import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn
import safetensors.torch

import compare
import model as model_lib

ARCHS = ("matryoshka_batchtopk", "batchtopk", "topk", "relu")
_AUX_ALPHA = 1 / 32  # §1.10: weight of the aux-k loss
_THRESHOLD_BETA = 0.999  # §1.11: EMA decay of the inference threshold
_TOPK_SAMPLE_STRIDE = 61  # batch_topk estimates its cut from every 61st entry (prime: it cycles through the columns)


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
                        group_sizes=sizes, scale=1.0, seed=seed, **meta)  # train.py passes the run's seed
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
        # tied init, untied training. The clone keeps W_dec's memory layout, (F, d) row-major, the
        # layout in which the sparse path builds W_enc's gradient
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # set to the geometric median at step 0 (§1.4)
        self.register_buffer("threshold", torch.tensor(-1.0))  # θ, -1 = unset (§1.11)

    def pre_acts(self, x):
        """a = ReLU((x - b_dec) W_enc + b_enc) (§1.5); the ReLU arch has no pre-encoder bias (§2)."""
        x = x.to(self.W_enc.dtype)  # e.g. Gemma's bf16 residual: the SAE stays fp32 (README: the SAE keeps fp32 parameters)
        if self.cfg["arch"] != "relu":
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def select(self, a, ascending=False):
        """Training-time sparsity of a (N, F): the flat indices and values of the kept entries;
        ascending=True orders them row-major, as the sparse products want. BatchTopK keeps the k*N
        largest entries of the whole batch (§1.6), TopK k per token (§2)."""
        n, d_sae = a.shape
        k = self.cfg["k"]
        if self.cfg["arch"] == "topk":
            vals, cols = a.topk(k, dim=-1, sorted=False)
            if ascending:
                cols, order = cols.sort(dim=-1)
                vals = vals.gather(-1, order)
            rows = torch.arange(n, device=a.device).unsqueeze(1)
            return (rows * d_sae + cols).flatten(), vals.flatten()
        return batch_topk(a, k * n, ascending)

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

    def _decode_groups(self, f):
        """§1.7: each Matryoshka group's share of the reconstruction, f[:, g_i] W_dec[g_i], as (N, G, d)."""
        bounds = [0, *itertools.accumulate(self.cfg["group_sizes"])]
        return torch.stack([f[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip(bounds, bounds[1:])], dim=1)

    def _decode_groups_sparse(self, rows, cols, vals, n, by_column, column_starts):
        """_decode_groups from the kept entries only (sorted by row, then column), in one sparse
        product whose output rows are (token, group) pairs."""
        sizes = self.cfg["group_sizes"]
        group_ends = torch.tensor(sizes[:-1], device=cols.device).cumsum(0)
        groups = torch.bucketize(cols, group_ends, right=True)
        parts = _SparseDecode.apply(vals, self.W_dec, rows * len(sizes) + groups, cols, by_column, column_starts,
                                    n * len(sizes))
        return parts.view(n, len(sizes), -1)

    def _training_pre_acts(self, x):
        """pre_acts(x) as ReLU(x W_enc + (b_enc - b_dec W_enc)): the same values, but b_dec's gradient
        through the encoder becomes a (d, F) @ (F,) product instead of a (B, F) @ (F, d) one."""
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x, self.W_enc).relu_()

    def training_loss(self, x, dead_mask=None, l1_scale=1.0, sparse=None):
        """The training objective on x (B, d_in) (already divided by the scale s, §1.3).
        Returns (loss, stats, kept). stats: detached tensors loss, rec (full-width MSE), aux,
        prefix_losses (G,), l0 (+ l1 for ReLU), and for the loop's bookkeeping fired (F,) bool and
        min_act: (f != 0).any(0) and batch_min_positive(f) of the kept latents f.
        kept = (idx, vals): f's kept entries, detached, as flat indices into (B, F) and their values
        (zeros can be among them). The dense f, if wanted, is
        torch.zeros(B * F).index_put_((idx,), vals).view(B, F). None for the ReLU arch, which selects
        nothing: its f is pre_acts(x).

        dead_mask (F,) bool: latents dead by the 10M-token rule (§1.9) unless they fire in x: aux-k
        runs on those of them that x does not fire, as dictionary_learning counts the batch's firing
        before aux-k reads its counters (trainers/matryoshka_batch_top_k.py v0.1.0, loss(): lines
        297-302 update num_tokens_since_fired, then get_auxiliary_loss reads it). None skips aux-k.
        l1_scale: the ReLU arch's L1 warm-up factor min(t/T_sw, 1) (§2); a 0-d tensor avoids
        recompiles under torch.compile.

        sparse (None = True on CPU in fp32 and fp64, the dtypes CPU's sampled_addmm takes): after
        the encoder's one dense product, work from the k*B kept entries only: the decoder, the
        encoder's weight gradient, and aux-k over the dead latents' columns only. Same values and
        gradients as the dense path (tests/test_sae.py), 3-6x faster per step on a 2-core CPU
        (bench.py). It reads the number of dead latents on the host (one sync when dead_mask is
        given) and runs eagerly. The dense path is the plain math with no host sync: it always
        computes aux-k and zeroes it with torch.where when no latent is dead, so it compiles
        without graph breaks; big dense products suit a GPU."""
        x = x.to(self.W_enc.dtype)  # e.g. Gemma's bf16 residual: the SAE stays fp32 (README: the SAE keeps fp32 parameters)
        if self.cfg["arch"] == "relu":  # §2: MSE + λ·mean_b Σ_i f_i ||W_dec,i||
            a = self.pre_acts(x)
            rec = (x - self.decode(a)).pow(2).sum(-1).mean()
            l1 = (a * self.W_dec.norm(dim=1)).sum(-1).mean()
            loss = rec + self.cfg["l1_coefficient"] * l1_scale * l1
            stats = dict(loss=loss, rec=rec, aux=x.new_zeros(()), l1=l1,
                         prefix_losses=rec.reshape(1), l0=(a > 0).sum(-1).float().mean(),
                         fired=(a > 0).any(0), min_act=batch_min_positive(a))
            return loss, {key: t.detach() for key, t in stats.items()}, None

        n, d_sae = len(x), self.cfg["d_sae"]
        if sparse is None:
            sparse = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        if sparse:
            # the one dense product; no autograd graph is kept for it, and it stays fp32 under
            # autocast since the sparse products below take no bf16
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                a = self._training_pre_acts(x)
            idx, vals = self.select(a, ascending=True)
            rows, cols = idx // d_sae, idx % d_sae
            # the entries in column order (tokens ascending within a column) and where each column
            # starts in it, for the two transposed products of the backward pass
            sorted_cols, by_column = cols.int().sort(stable=True)  # int32 sorts twice as fast
            column_starts = torch.searchsorted(sorted_cols, torch.arange(d_sae + 1, dtype=torch.int32,
                                                                         device=x.device))
            vals = _SelectedActs.apply(self.W_enc, self.b_enc, self.b_dec, x, vals, rows, cols, by_column,
                                       column_starts)
            parts = self._decode_groups_sparse(rows, cols, vals, n, by_column, column_starts)
        else:
            a = self._training_pre_acts(x)
            idx, vals = self.select(a)
            cols = idx % d_sae
            f = torch.zeros_like(a).flatten().scatter(0, idx, vals).view_as(a)
            parts = self._decode_groups(f)
        # §1.7-1.8: x̂_i = b_dec + Σ_{j<=i} part_j and L_i = mean_b Σ_d (x - x̂_i)². L_rec = (1/G) Σ_i w_i L_i
        # with w_i = 1/G: the 1/G² scale is dictionary_learning's quirk, kept for parity (it matters
        # only relative to the aux term and grad clipping). G = 1 for BatchTopK/TopK: plain MSE.
        prefix_losses, residual = _PrefixLosses.apply(x - self.b_dec, parts)
        rec = (prefix_losses / parts.shape[1]).mean()
        # what the loop needs from f, read off the k*B kept entries instead of all B*F: the latents
        # that fired (§1.9) and m, the smallest positive activation (§1.11)
        kept_vals = vals.detach()  # in the SAE's dtype, or bf16 under autocast
        fired = kept_vals.new_zeros(d_sae).scatter_reduce(0, cols, kept_vals, "amax") > 0
        aux = x.new_zeros(())
        if dead_mask is not None:  # x - x̂_G, detached (§1.10)
            dead_mask = dead_mask & ~fired
            aux = (self._aux_loss_sparse(residual, x, dead_mask) if sparse
                   else self._aux_loss(residual, a, dead_mask))
        loss = rec + _AUX_ALPHA * aux
        stats = dict(loss=loss, rec=prefix_losses[-1], aux=aux, prefix_losses=prefix_losses,
                     l0=(kept_vals > 0).sum().float() / n, fired=fired, min_act=batch_min_positive(kept_vals))
        return loss, {key: t.detach() for key, t in stats.items()}, (idx, vals.detach())

    def _aux_loss(self, residual, a, dead_mask):
        """§1.10 aux-k (arXiv:2406.04093): reconstruct the detached residual from the top
        k_aux = min(d/2, n_dead) post-ReLU activations of dead latents, decoded without b_dec,
        normalised by the residual's variance. Selecting a fixed d/2 entries with the live ones
        set to -1 and then dropping those gives min(d/2, n_dead) without knowing n_dead on the host."""
        k_aux = min(self.cfg["d_in"] // 2, self.cfg["d_sae"])
        vals, cols = torch.where(dead_mask, a, -1.0).topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(a).scatter(-1, cols, vals.clamp(min=0))
        aux = _normalised_error(residual, acts @ self.W_dec)
        return torch.where(dead_mask.any(), aux, 0.0)

    def _aux_loss_sparse(self, residual, x, dead_mask):
        """_aux_loss on the dead latents' columns only: the same value and gradients at a cost that
        grows with n_dead (none dead: no work). Reads n_dead on the host."""
        dead = dead_mask.nonzero().squeeze(1)
        if len(dead) == 0:
            return x.new_zeros(())
        # the dead columns of W_enc, gathered as rows of its (F, d) storage: faster, and the gradient
        # comes back in W_enc's layout instead of needing a transposing copy
        W_dead = self.W_enc.T[dead].T
        acts = torch.addmm(self.b_enc[dead] - self.b_dec @ W_dead, x, W_dead).relu_()  # (B, n_dead)
        k_aux = min(self.cfg["d_in"] // 2, len(dead))
        if k_aux < len(dead):
            vals, cols = acts.topk(k_aux, dim=-1, sorted=False)
            acts = torch.zeros_like(acts).scatter(-1, cols, vals)
        return _normalised_error(residual, acts @ self.W_dec[dead])


def _normalised_error(residual, reconstruction):
    """§1.10: mean_b Σ_d (e - ê)² / mean_b Σ_d (e - ē)², NaN (a constant residual) -> 0."""
    error = (residual - reconstruction).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return torch.nan_to_num(error / variance, nan=0.0)


def batch_topk(a, n_keep, ascending=False):
    """The n_keep largest entries of a (N, F) as (flat indices, values) (§1.6), the indices in
    ascending order when asked (and always on the CPU path below).
    On a GPU, and under torch.compile, one torch.topk over all N*F entries. On a CPU that top-k runs
    on one core and costs as much as the encoder's matmul, so select by threshold instead: a strided
    sample's top values give a cut t a little below the n_keep-th largest; the entries >= t (a few
    more than n_keep) are the candidates, and their n_keep-th largest value is the exact cut. Exact
    like topk: among entries tied at the cut the first ones are kept (any tied choice is a valid top)."""
    flat = a.reshape(-1)
    if a.device.type != "cpu" or torch.compiler.is_compiling():
        vals, idx = flat.topk(n_keep, sorted=False)
        if ascending:
            idx, order = idx.sort()
            vals = vals[order]
        return idx, vals
    sample = flat[::_TOPK_SAMPLE_STRIDE]
    # 5% + 64 spare in the sample's count: the candidates fall short of n_keep only by a many-sigma fluke
    n_sample = min(len(sample), int(1.05 * n_keep / _TOPK_SAMPLE_STRIDE) + 64)
    cut = sample.topk(n_sample, sorted=False).values.min()
    idx = (flat >= cut).nonzero().squeeze(1)
    if len(idx) < n_keep:  # the sample misjudged the cut: every entry is a candidate
        idx = torch.arange(len(flat), device=a.device)
    vals = flat.index_select(0, idx)  # index_select: half the time of flat[idx] on a CPU
    cut = vals.kthvalue(len(vals) - n_keep + 1).values  # the n_keep-th largest
    keep = vals > cut
    ties = (vals == cut).nonzero().squeeze(1)
    keep[ties[:n_keep - int(keep.sum())]] = True
    keep = keep.nonzero().squeeze(1)
    return idx.index_select(0, keep), vals.index_select(0, keep)


# -----------------------------------------------------------------------------
# Sparse products for training_loss(sparse=True). A kept entry e is (row, column, value); a sparse
# (R, C) matrix S given by such entries times a dense (C, d) table is embedding_bag's weighted sum.

def _weighted_bags(members, starts, weights, table):
    """out[j] = Σ_{e in bag j} weights[e] table[members[e]], where bag j is the entries
    starts[j]:starts[j+1] (len(starts) = number of bags + 1): embedding_bag's weighted sum."""
    # used inside autograd Functions only: detached inputs spare embedding_bag the bookkeeping for a
    # backward of its own (a third of its time), which it keys on requires_grad, not on grad mode
    return nn.functional.embedding_bag(members, table.detach(), starts, mode="sum",
                                       per_sample_weights=weights.detach(), include_last_offset=True)


def _sparse_transposed_times(rows, weights, table, by_column, column_starts):
    """S^T @ table for the S of _SparseDecode: its entries re-sorted by column (by_column, a stable
    argsort of the columns), column c's entries being column_starts[c]:column_starts[c+1] in that order."""
    return _weighted_bags(rows.index_select(0, by_column), column_starts, weights.index_select(0, by_column), table)


class _SelectedActs(torch.autograd.Function):
    """The kept entries vals = a[rows, cols] of a = ReLU((x - b_dec) W_enc + b_enc), selected from a
    computed without autograd, given their gradient. Every other entry of a has zero gradient, so
    the backward sums over the kept ones only instead of the dense (d, B) @ (B, F) product: with g
    the gradient through the ReLU, dW_enc[:, c] = Σ_{e in column c} g_e (x - b_dec)[row_e],
    db_enc[c] = Σ_{e in column c} g_e, db_dec = -W_enc db_enc."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, b_dec, x, vals, rows, cols, by_column, column_starts):
        ctx.save_for_backward(W_enc, b_dec, x, vals, rows, cols, by_column, column_starts)
        return vals.view_as(vals)

    @staticmethod
    def backward(ctx, grad):
        W_enc, b_dec, x, vals, rows, cols, by_column, column_starts = ctx.saved_tensors
        grad = grad * (vals > 0)  # the ReLU's gradient
        grad_W_enc = _sparse_transposed_times(rows, grad, x - b_dec, by_column, column_starts).T
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """out = S @ W_dec for the sparse (n_rows, F) S with S[rows[e], cols[e]] = vals[e] (rows ascending,
    columns ascending within a row): the decoder over the kept entries, not a dense (B, F) @ (F, d).
    by_column and column_starts order the entries by column for the backward (_sparse_transposed_times)."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, by_column, column_starts, n_rows):
        row_starts = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
        ctx.save_for_backward(vals, W_dec, rows, cols, by_column, column_starts, row_starts)
        return _weighted_bags(cols, row_starts, vals, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        vals, W_dec, rows, cols, by_column, column_starts, row_starts = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # d out / d vals[e] = grad_out[rows[e]] · W_dec[cols[e]]: (grad_out @ W_dec^T) at the kept entries only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(row_starts, cols, torch.ones_like(vals),
                                              (len(grad_out), len(W_dec)), check_invariants=False)
        grad_vals = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.T, beta=0).values()
        return (grad_vals, _sparse_transposed_times(rows, vals, grad_out, by_column, column_starts),
                None, None, None, None, None)


class _PrefixLosses(torch.autograd.Function):
    """§1.8's prefix losses L_i = mean_b ||r_i||² with r_i = r_0 - Σ_{j<=i} p_j, for r_0 = x - b_dec
    and the groups' decoder outputs p (n, G, d); also r_G, not differentiable (aux-k takes it
    detached). By hand because autograd keeps G chains of temporaries and copies the (n, G, d)
    gradient once more. Since dL_i/dp_j = -(2/n) r_i for j <= i, the gradient of p_j is
    q_j = -(2/n) Σ_{i>=j} g_i r_i: a running sum from the last group down, which ends as minus
    r_0's gradient. The backward walks the residuals down again, r_{i-1} = r_i + p_i, instead of
    keeping all G of them from the forward."""

    @staticmethod
    def forward(ctx, r0, parts):
        r, losses = r0.clone(), []
        for part in parts.unbind(1):
            r.sub_(part)
            losses.append(torch.dot(r.view(-1), r.view(-1)))
        ctx.save_for_backward(parts, r)
        ctx.mark_non_differentiable(r)
        return torch.stack(losses) / len(r0), r

    @staticmethod
    def backward(ctx, grad_losses, _):
        parts, r = ctx.saved_tensors
        n, G, _ = parts.shape
        weights = grad_losses * (-2 / n)  # q_j = q_{j+1} + weights[j] r_j
        grad_parts = torch.empty_like(parts)
        running = r * weights[-1]
        grad_parts[:, -1] = running
        r = r.clone()
        for j in reversed(range(G - 1)):
            r += parts[:, j + 1]  # r_j from r_{j+1}
            running.addcmul_(r, weights[j])
            grad_parts[:, j] = running
        return -running, grad_parts


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
    if not f.numel():  # nothing kept: a diverged SAE's NaN pre-activations (train.py stops it)
        return f.new_zeros(())
    smallest = torch.where(f > 0, f, math.inf).min()
    return torch.where(torch.isinf(smallest), 0.0, smallest)


@torch.no_grad()
def update_threshold(sae, m):
    """§1.11: θ ← m if θ is unset (< 0), else θ ← 0.999 θ + 0.001 m; fp32 with autocast off."""
    with torch.autocast(sae.threshold.device.type, enabled=False):
        theta, m = sae.threshold, torch.as_tensor(m, device=sae.threshold.device).float()
        theta.copy_(torch.where(theta < 0, m, _THRESHOLD_BETA * theta + (1 - _THRESHOLD_BETA) * m))


@torch.no_grad()
def calibrate_threshold(sae, x, target_l0, batch_tokens=4096, iters=60):
    """The inference threshold θ at which encode(x) fires target_l0 latents per token on average,
    by bisection on the pre-activations of x (N, d) (README: calibrated thresholds). The EMA of
    §1.11 lags its steady state in short runs and differs between arms, so comparing arms at
    nominal k compares them at different L0; calibrating on clean held-out tokens puts every SAE at
    the same measured L0. Returns (θ, the mean L0 θ gives on x); sae is not changed. Ties aside,
    the achieved L0 is within one firing per N tokens of the target."""
    if sae.cfg["arch"] not in ("batchtopk", "matryoshka_batchtopk"):
        raise ValueError(f"only BatchTopK SAEs have a global inference threshold, not {sae.cfg['arch']}")
    if not 0 < target_l0 <= sae.cfg["d_sae"] or len(x) == 0:
        raise ValueError(f"target L0 must be in (0, d_sae={sae.cfg['d_sae']}] on a non-empty x, "
                         f"got {target_l0} on {len(x)} tokens")
    return threshold_at_l0(sorted_positive_pre_acts(sae, x, batch_tokens), len(x), target_l0, iters)


@torch.no_grad()
def sorted_positive_pre_acts(sae, x, batch_tokens=4096):
    """The positive pre-activations of x (N, d), flattened and sorted (float32): what the L0 of
    every θ ≥ 0 depends on, so one sort serves any number of targets (threshold_at_l0)."""
    w = sae.W_enc
    pre = torch.cat([sae.pre_acts(c.to(w.device, w.dtype)).float().flatten() for c in x.split(batch_tokens)])
    return pre[pre > 0].sort().values


def threshold_at_l0(positive, n_tokens, target_l0, iters=60):
    """calibrate_threshold's search: θ ≥ 0 by bisection, where L0(θ) counts positive pre-activations
    alone, each count a search in the sorted ones (the same count as (pre > θ).sum(), which compares
    in float32 too), not a pass over N·F. Returns (θ, the mean L0 it gives on the n_tokens tokens)."""
    def mean_l0(theta):
        at = torch.searchsorted(positive, torch.tensor([theta], dtype=positive.dtype, device=positive.device), right=True)
        return (len(positive) - int(at[0])) / n_tokens

    if mean_l0(0.0) <= target_l0:  # too few positive pre-activations: θ = 0 is the densest it gets
        return 0.0, mean_l0(0.0)
    lo, hi = 0.0, float(positive[-1])  # L0(lo) ≥ target ≥ L0(hi) = 0
    for _ in range(iters):  # L0(θ) falls as θ rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_l0(mid) > target_l0 else (lo, mid)
    achieved_hi, achieved_lo = mean_l0(hi), mean_l0(lo)  # the bracket's two sides: keep the nearer
    return (hi, achieved_hi) if abs(achieved_hi - target_l0) <= abs(achieved_lo - target_l0) else (lo, achieved_lo)


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file, and free what the partial one took
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {e.strerror or e}") from None


def _tensors(sae):
    return {name: t.detach().cpu().contiguous() for name, t in
            dict(W_enc=sae.W_enc, W_dec=sae.W_dec, b_enc=sae.b_enc, b_dec=sae.b_dec,
                 threshold=sae.threshold).items()}


def save(sae, folder):
    """folder/sae.safetensors + folder/cfg.json, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, "sae.safetensors"), safetensors.torch.save(_tensors(sae)))
    _write_atomic(os.path.join(folder, "cfg.json"), json.dumps(sae.cfg, indent=2).encode())


def read_cfg(folder):
    """folder/cfg.json as save() writes it, checked: the keys load() needs, of usable types."""
    cfg_path = os.path.join(folder, "cfg.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no SAE file at {cfg_path}")
    cfg = model_lib.read_json_object(cfg_path)
    for key in ("arch", "d_in", "d_sae", "k", "group_sizes", "scale"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing key '{key}'")
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"{cfg_path}: unknown arch '{cfg['arch']}', expected one of {ARCHS}")
    for key in ("d_in", "d_sae"):
        if type(cfg[key]) is not int or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: '{key}' must be a positive integer, got {cfg[key]!r}")
    if cfg["arch"] != "relu" and not (type(cfg["k"]) is int and 0 < cfg["k"] <= cfg["d_sae"]):
        raise ValueError(f"{cfg_path}: arch '{cfg['arch']}' needs an integer k in [1, d_sae={cfg['d_sae']}], "
                         f"got {cfg['k']!r}")
    sizes = cfg["group_sizes"]
    if (not isinstance(sizes, list) or not sizes or any(type(g) is not int or g <= 0 for g in sizes)
            or sum(sizes) != cfg["d_sae"]):
        raise ValueError(f"{cfg_path}: group_sizes {sizes} do not split d_sae={cfg['d_sae']}")
    return cfg


def load(path, device="cpu"):
    """Load an SAE saved by save(); path is its folder or its sae.safetensors file. The arch is
    read from cfg.json and never defaulted, so a TopK SAE cannot load as ReLU (SAELens#308).
    Weights stored in another float dtype (fp16, bf16, fp64: another tool's export) are converted
    to the float32 the SAE computes in, with a note; integer weights (quantised or not weights at
    all) and non-finite ones are refused, since every number computed from them would be wrong."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights_path = path if path.endswith(".safetensors") else os.path.join(folder, "sae.safetensors")
    if not os.path.isfile(weights_path):
        inside = sorted(os.path.join(path, d) for d in os.listdir(path)
                        if os.path.isfile(os.path.join(path, d, "sae.safetensors"))) if os.path.isdir(path) else []
        raise FileNotFoundError(f"no SAE file at {weights_path}" +
                                (f"; the SAEs are in {', '.join(inside)}" if inside else ""))
    cfg = read_cfg(folder)
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
    converted = set()
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise ValueError(f"{weights_path}: tensor '{name}' is {t.dtype}; SAE weights must be floating "
                             "point (a quantised or damaged file?)")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_path}: tensor '{name}' holds {int((~torch.isfinite(t)).sum())} "
                             "NaN/inf values: the SAE diverged or the file is damaged")
        if t.dtype != torch.float32:
            converted.add(str(t.dtype).removeprefix("torch."))
    if converted:
        print(f"note: {weights_path} stores {'/'.join(sorted(converted))} weights; converted to float32")
    sae.load_state_dict(tensors)  # copies into the float32 parameters
    if cfg["arch"] in ("batchtopk", "matryoshka_batchtopk") and "threshold_used" not in cfg:
        print(f"note: {folder}/cfg.json records no calibrated threshold (exported before train.py calibrated "
              f"them): using its stored EMA θ = {float(sae.threshold):.4g}")
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
    if os.path.isfile(os.path.join(folder, "sae.safetensors")):
        raise FileExistsError(f"{folder} holds an SAE of ours (sae.safetensors), whose cfg.json the export "
                              f"would overwrite: export into another folder, e.g. export/k20")
    tensors = _tensors(sae)
    tensors["threshold"] = (torch.zeros(sae.cfg["d_sae"]) if arch == "relu" else
                            tensors["threshold"].expand(sae.cfg["d_sae"]).contiguous())
    # model_name: the hub id train.py recorded (prepare.py's source.json); the local folder the
    # model was loaded from stays beside it as model_path (SAELens' metadata takes any key)
    metadata = dict(model_name=sae.cfg.get("model_name") or sae.cfg.get("model"),
                    hook_name=f"blocks.{sae.cfg['layer']}.hook_resid_post", hook_head_index=None,
                    prepend_bos=True, model_path=sae.cfg.get("model"))
    cfg = dict(architecture="jumprelu", d_in=sae.cfg["d_in"], d_sae=sae.cfg["d_sae"], dtype="float32",
               device="cpu", apply_b_dec_to_input=arch != "relu", normalize_activations="none",
               reshape_activations="none", activation_fn="relu", **metadata, metadata=metadata)
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, "sae_weights.safetensors"), safetensors.torch.save(tensors))
    _write_atomic(os.path.join(folder, "cfg.json"), json.dumps(cfg, indent=2).encode())


def model_card(cfg, result=None):
    """README.md for a published SAE: what it was trained on and how, and its headline numbers
    from evaluate.py's eval.json (`result`), each with its interval where eval.json holds one
    (a metric's "uncertainty": {key: {"ci95": [low, high]}})."""
    name = cfg.get("model_name") or cfg.get("model")
    p = cfg.get("mask_prob")
    arm = "not recorded" if p is None else "baseline (mask_prob 0)" if p == 0 else f"masked (mask_prob {p})"
    hook = cfg.get("hook", f"blocks.{cfg.get('layer')}.hook_resid_post")
    lines = ["---", "library_name: saelens", "tags: [sparse-autoencoder, masked-regularization]", "---", "",
             f"# {cfg['arch']} SAE, {cfg['d_sae']} latents, on {name} layer {cfg.get('layer')}", "",
             "From a masked-regularization SAE experiment (arXiv 2604.06495): the masked arm replaces "
             "input tokens by a mask token at random (probability mask_prob) while harvesting the "
             "training activations; the baseline arm does not. The SAE encodes raw residual activations.", "",
             "| | |", "|---|---|",
             f"| model | {name} (loaded from `{cfg.get('model')}`) |",
             f"| hook | `{hook}` |",
             f"| arm | {arm} |",
             f"| architecture | {cfg['arch']}, k = {cfg.get('k')}, d_in = {cfg['d_in']}, d_sae = {cfg['d_sae']} |",
             f"| training tokens | {cfg.get('training_tokens')} |",
             f"| seed | {cfg.get('seed')} |", ""]
    rows = compare.headline_entries(result) if result else []
    if rows:
        lines += ["| metric | value |", "|---|---:|"]
        for label, metric, key, value in rows:
            interval = ((result[metric].get("uncertainty") or {}).get(key) or {}).get("ci95")
            shown = "—" if value is None else f"{value:.4f}"
            if value is not None and interval and None not in interval:
                shown += f" [{interval[0]:.4f}, {interval[1]:.4f}]"
            lines.append(f"| {label} | {shown} |")
        lines.append("")
    else:
        lines += ["Not evaluated yet (no eval.json).", ""]
    lines += ["## Files", "",
              "- `sae.safetensors`, `cfg.json`: this project's format, `sae.load(folder)`.",
              "- `saelens/`: the same SAE as SAELens' JumpReLU (`sae.export_saelens`), where the "
              "architecture has one (TopK does not).",
              "- `eval.json`, `saebench/`: every number evaluate.py computed, and the same numbers "
              "in SAEBench's result schema.", ""]
    return "\n".join(lines)


def push_to_hub(folder, repo_id, dry_run_dir=None, token=None, private=False):
    """Publish the SAE train.py saved in `folder` as the Hub model repo `repo_id` ("user/name")
    with huggingface_hub's upload_folder: our sae.safetensors + cfg.json, eval.json and the
    saebench/ files when evaluate.py has run, the SAELens export in saelens/, and a generated
    README.md (model_card). dry_run_dir: only write that folder, upload nothing. token: else
    HF_TOKEN or a saved `hf auth login`. Returns the folder written or the commit's URL."""
    sae = load(folder)
    result = model_lib.read_json_object(os.path.join(folder, "eval.json")) if os.path.isfile(
        os.path.join(folder, "eval.json")) else None
    if dry_run_dir and os.path.isdir(dry_run_dir) and os.listdir(dry_run_dir):
        raise FileExistsError(f"push_to_hub: dry_run_dir {dry_run_dir} is not empty; pass a new folder")
    staging = dry_run_dir or tempfile.mkdtemp(prefix="sae-hub-")
    os.makedirs(staging, exist_ok=True)
    try:
        for name in ("sae.safetensors", "cfg.json", "eval.json"):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(staging, name))
        if os.path.isdir(os.path.join(folder, "saebench")):
            shutil.copytree(os.path.join(folder, "saebench"), os.path.join(staging, "saebench"), dirs_exist_ok=True)
        if sae.cfg["arch"] != "topk":  # TopK has no JumpReLU form (export_saelens)
            export_saelens(sae, os.path.join(staging, "saelens"))
        _write_atomic(os.path.join(staging, "README.md"), model_card(sae.cfg, result).encode())
        if dry_run_dir:
            return dry_run_dir
        return _upload(staging, repo_id, token, private)
    finally:
        if not dry_run_dir:
            shutil.rmtree(staging, ignore_errors=True)


def _upload(staging, repo_id, token, private):
    """upload_folder with one-line errors for the two usual failures: no token, no network."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    endpoint = constants.ENDPOINT  # HF_ENDPOINT, else https://huggingface.co
    token = token or huggingface_hub.get_token()
    if not token:
        raise RuntimeError("push_to_hub: no Hugging Face token: pass token=..., set HF_TOKEN or run "
                           "`hf auth login` (dry_run_dir=... writes the folder without one)")
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=staging, repo_id=repo_id,
                                 commit_message="Upload SAE (masked-regularization SAEs, sae.push_to_hub)")
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"push_to_hub: {endpoint} refused {repo_id!r}: {first}") from None
    except Exception as e:  # the HTTP client's transport errors, whichever client huggingface_hub uses
        if not any(c.__name__ in ("TransportError", "ConnectionError") for c in type(e).__mro__):
            raise
        raise RuntimeError(f"push_to_hub: cannot reach {endpoint} ({type(e).__name__}: {e}); check the "
                           "network, or pass dry_run_dir=... to write the folder only") from None
    return info.commit_url
