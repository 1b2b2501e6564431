"""Our own forward pass for GPT-NeoX (all Pythia sizes), Gemma-2 and Gemma 3 (text), read from a Hugging
Face folder.

One Transformer class covers all three architectures; they differ only in Config fields. Every numerical
choice mirrors transformers' GPTNeoXForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM;
tests/test_model.py checks logits and every layer against transformers.

    import model
    m = model.load("data/tiny/model")          # config.json + *.safetensors, never pickle
    logits = m(idx, attention_mask)            # (B, T, vocab); attention_mask 1 = real, right padding
    x = m.resid_post(idx, 8)                   # residual after block 8 = HF hidden_states[9]
    x = m.resid_post(idx, 8, mask, positions)  # (B, d): the same, at one position per row
    logits = m.forward_from(x_hat, 8)          # finish the forward from a replaced residual
    keep = m.valid_mask(idx, attention_mask)   # False at BOS/EOS/pad ids and at padding
"""
import ctypes
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

_ARCHITECTURES = {"GPTNeoXForCausalLM": "gpt_neox", "Gemma2ForCausalLM": "gemma2",
                  "Gemma3ForCausalLM": "gemma3",
                  "Gemma3ForConditionalGeneration": "gemma3"}  # the vision-language Gemma 3: its text decoder
_MULTIMODAL = "Gemma3ForConditionalGeneration"
_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}  # HF activation name -> F.gelu(approximate=)
# Buffers that older GPT-NeoX checkpoints saved; we recompute masks and rotary angles instead.
_SKIPPED_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
_HINT = "run `python prepare.py --model=...` to download or build the model folder"
_POSITIVE_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "sliding_window")
_HF_MODULES = {  # our module -> HF module (checkpoint tensor names without .weight / .bias)
    "gpt_neox": {
        "embed": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm", "head": "embed_out",
        "blocks.{i}.ln_attn": "gpt_neox.layers.{i}.input_layernorm",
        "blocks.{i}.attn.qkv": "gpt_neox.layers.{i}.attention.query_key_value",
        "blocks.{i}.attn.out": "gpt_neox.layers.{i}.attention.dense",
        "blocks.{i}.ln_mlp": "gpt_neox.layers.{i}.post_attention_layernorm",
        "blocks.{i}.mlp.up": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
        "blocks.{i}.mlp.down": "gpt_neox.layers.{i}.mlp.dense_4h_to_h"},
    "gemma2": {
        "embed": "model.embed_tokens", "ln_f": "model.norm", "head": "lm_head",
        "blocks.{i}.ln_attn": "model.layers.{i}.input_layernorm",
        "blocks.{i}.attn.qkv": tuple(f"model.layers.{{i}}.self_attn.{x}_proj" for x in "qkv"),
        "blocks.{i}.attn.out": "model.layers.{i}.self_attn.o_proj",
        "blocks.{i}.ln_attn_out": "model.layers.{i}.post_attention_layernorm",
        "blocks.{i}.ln_mlp": "model.layers.{i}.pre_feedforward_layernorm",
        "blocks.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
        "blocks.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
        "blocks.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
        "blocks.{i}.ln_mlp_out": "model.layers.{i}.post_feedforward_layernorm"},
}
_HF_MODULES["gemma3"] = {**_HF_MODULES["gemma2"],  # Gemma 3 adds a per-head RMSNorm on q and k
                         "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
                         "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm"}
# Gemma3ForConditionalGeneration files hold the text decoder under a prefix: "language_model.model." in the
# hub files (and as transformers 5 save_pretrained writes them), "model.language_model." as the model names
# them in memory (transformers' conversion_mapping.py "llava" renames the first to the second). Read as
# "model." and "lm_head." here. Only the text decoder is read: the vision tower and the projector are
# skipped by name (_VISION_PREFIXES).
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.",
                    "model.vision_tower.", "model.multi_modal_projector.")
# Gemma 3 config.json files leave out keys at transformers' Gemma3TextConfig defaults (gemma-3-4b's
# text_config names six keys), and those defaults differ from Gemma-2's: no soft-caps, two RoPE bases, ...
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    query_pre_attn_scalar=256, attention_bias=False,
    attn_logit_softcapping=None, final_logit_softcapping=None,
    sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, bos_token_id=2)


@dataclass
class Config:
    arch: str                           # "gpt_neox" | "gemma2" | "gemma3"
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int                      # < n_head: grouped-query attention (Gemma)
    head_dim: int
    d_mlp: int
    vocab_size: int
    norm_eps: float
    rotary_dim: int                     # Pythia rotates only the first rotary_pct of each head
    rope_theta: float                   # RoPE base; Gemma 3: of the global (full-attention) layers only
    gelu_approximate: str               # "none": exact erf GELU (Pythia); "tanh" (Gemma)
    attn_scale: float                   # head_dim**-0.5; Gemma: query_pre_attn_scalar**-0.5
    attn_bias: bool = True
    parallel_residual: bool = False     # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    tied_embeddings: bool = False
    attn_softcap: float | None = None   # Gemma-2: scores -> tanh(scores / cap) * cap
    final_softcap: float | None = None  # Gemma-2: the same on the logits
    sliding_window: int | None = None
    sliding_layers: tuple = ()          # indices of the layers that use the sliding window
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (None: rope_theta)
    rope_scale: float = 1.0             # Gemma 3 4B+: linear RoPE scaling (angles / factor), global layers
    multimodal: bool = False            # Gemma3ForConditionalGeneration: tensor names carry a prefix
    bos_token_id: int | None = None
    eos_token_id: int | None = None     # the first one when config.json lists several
    pad_token_id: int | None = None
    special_ids: tuple = ()             # every distinct bos/eos/pad id in config.json

    @property
    def gemma(self):  # Gemma-2 and 3: RMSNorm (1 + w), sandwich norms, GeGLU, embeddings times sqrt(d)
        return self.arch in ("gemma2", "gemma3")


class Norm(nn.Module):
    """LayerNorm (GPT-NeoX), or Gemma's RMSNorm: scales by (1 + w), computed in fp32 as HF does."""

    def __init__(self, d, eps, rms):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.zeros(d) if rms else torch.ones(d))
        self.bias = None if rms else nn.Parameter(torch.zeros(d))

    def forward(self, x):
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rotary_cos_sin(rotary_dim, theta, scale, T, device, dtype):
    """(T, rotary_dim) cos and sin for RoPE base theta; angles in fp32, then cast to the model dtype (as HF).
    Linear scaling divides the frequencies by `scale`, as HF's _compute_linear_scaling_rope_parameters."""
    dims = torch.arange(0, rotary_dim, 2, device=device).float()
    inv_freq = 1.0 / theta ** (dims / rotary_dim) / scale
    angles = torch.arange(T, device=device).float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head; HF's rotate_half pairs dim i with i + r/2."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)


def attention_allowed(T, attention_mask, window, device):
    """(B or 1, 1, T, T) bool, True = query may attend to key. Causal; keys must be real tokens
    (HF masks padded keys only); on sliding layers only keys with q - k < window (as HF).
    Every query may see itself: real queries already do, and a padded query whose row would be
    empty (far past the sliding window) gets finite values instead of SDPA's NaN."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed | (q == k)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.sizes = (q, kv, kv)
        # q, k, v in one matrix laid out [q heads | k heads | v heads]; load() converts HF's layouts
        self.qkv = nn.Linear(cfg.d_model, q + 2 * kv, bias=cfg.attn_bias)
        self.out = nn.Linear(q, cfg.d_model, bias=cfg.attn_bias)
        if cfg.arch == "gemma3":  # RMSNorm (1 + w) over each head's q and k, before RoPE (HF Gemma3Attention)
            self.q_norm = Norm(cfg.head_dim, cfg.norm_eps, rms=True)
            self.k_norm = Norm(cfg.head_dim, cfg.norm_eps, rms=True)

    def forward(self, x, cos, sin, allowed, at=None):
        """at: None, or one query position per row (B,): then every position gives keys and values,
        only those give queries, and the output is (B, 1, d)."""
        cfg, (B, T, _) = self.cfg, x.shape
        q, k, v = (t.view(B, T, -1, cfg.head_dim).transpose(1, 2) for t in self.qkv(x).split(self.sizes, -1))
        if cfg.arch == "gemma3":
            q, k = self.q_norm(q), self.k_norm(k)
        k = apply_rotary(k, cos, sin)
        if at is not None:
            rows = torch.arange(B, device=x.device)  # q: (B, heads, 1, head_dim), allowed: (B, 1, 1, T)
            q, allowed = q[rows, :, at].unsqueeze(2), allowed[rows, :, at].unsqueeze(2)
            cos, sin = cos[at, None, None], sin[at, None, None]
        q = apply_rotary(q, cos, sin)
        # GQA: each k/v head serves n_head // n_kv_head consecutive query heads (HF repeat_kv)
        k, v = (t.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1) for t in (k, v))
        if cfg.attn_softcap is None:
            # allowed=None means plainly causal: is_causal lets SDPA skip the masked half of the scores
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                               scale=cfg.attn_scale)
        else:  # Gemma-2 caps the scores before the mask, which SDPA cannot do: HF's eager path
            scores = (q @ k.transpose(-2, -1)) * cfg.attn_scale
            scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
            scores = scores.masked_fill(~allowed, float("-inf"))
            y = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.out(y.transpose(1, 2).reshape(B, q.shape[2], -1))


class MLP(nn.Module):
    """GPT-NeoX: down(gelu(up(x))) with biases. Gemma GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        gated = cfg.gemma
        self.act = cfg.gelu_approximate
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False) if gated else None
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=not gated)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=not gated)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x), approximate=self.act))
        return self.down(F.gelu(self.gate(x), approximate=self.act) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        rms = cfg.gemma
        self.ln_attn, self.attn = Norm(cfg.d_model, cfg.norm_eps, rms), Attention(cfg)
        self.ln_mlp, self.mlp = Norm(cfg.d_model, cfg.norm_eps, rms), MLP(cfg)
        if cfg.gemma:  # Gemma also normalizes each sublayer's output ("sandwich" norms)
            self.ln_attn_out = Norm(cfg.d_model, cfg.norm_eps, rms)
            self.ln_mlp_out = Norm(cfg.d_model, cfg.norm_eps, rms)

    def forward(self, x, cos, sin, allowed, at=None):
        """at: None, or one position per row (B,): the block's output there only, (B, 1, d)."""
        attn = self.attn(self.ln_attn(x), cos, sin, allowed, at)
        if at is not None:
            x = x[torch.arange(len(x), device=x.device), at, None]
        if self.cfg.gemma:
            x = x + self.ln_attn_out(attn)
            return x + self.ln_mlp_out(self.mlp(self.ln_mlp(x)))
        if self.cfg.parallel_residual:  # both sublayers read the same x; HF's order of additions
            return self.mlp(self.ln_mlp(x)) + attn + x
        x = attn + x
        return self.mlp(self.ln_mlp(x)) + x


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.special_ids = cfg.special_ids
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(cfg.d_model, cfg.norm_eps, cfg.gemma)
        self.head = None if cfg.tied_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx, attention_mask=None):
        """Logits (B, T, vocab) for token ids idx (B, T)."""
        x = self._run(self._embed(idx), range(self.cfg.n_layer), attention_mask)
        return self._logits(x)

    def resid_post(self, idx, layer, attention_mask=None, positions=None):
        """Residual stream after block `layer` (0-based; HF hidden_states[layer + 1]); runs no later block.
        positions: None, or one position per row (B,), which returns (B, d) at those positions and runs
        block `layer` only there (its keys and values still come from every earlier position): a
        probe that reads one token per text (absorption, OOD) saves that block's other positions."""
        self._check_layer(layer)
        if positions is not None:
            positions = torch.as_tensor(positions, device=idx.device)
            if positions.shape != idx.shape[:1] or ((positions < 0) | (positions >= idx.shape[1])).any():
                raise ValueError(f"positions must be one index in [0, {idx.shape[1]}) per row of idx "
                                 f"({len(idx)} rows), got {positions.tolist()}")
            if attention_mask is None:  # the selected queries need the causal mask spelt out
                attention_mask = torch.ones_like(idx)
        return self._run(self._embed(idx), range(layer + 1), attention_mask, positions)

    def forward_from(self, resid, layer, attention_mask=None):
        """Logits from a (possibly replaced) residual after block `layer`: blocks layer+1.., ln_f, head."""
        self._check_layer(layer)
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
            raise ValueError(f"resid must be (batch, seq, {self.cfg.d_model}), got {tuple(resid.shape)}")
        resid = resid.to(self.embed.weight.dtype)  # e.g. an fp32 SAE reconstruction into a bf16 model
        return self._logits(self._run(resid, range(layer + 1, self.cfg.n_layer), attention_mask))

    def valid_mask(self, idx, attention_mask=None):
        """Bool (B, T): True where the token is neither a special id (BOS/EOS/pad) nor padding."""
        keep = ~torch.isin(idx, torch.tensor(self.special_ids, dtype=idx.dtype, device=idx.device))
        return keep if attention_mask is None else keep & attention_mask.bool()

    def _check_layer(self, layer):
        if not 0 <= layer < self.cfg.n_layer:
            raise ValueError(f"layer {layer} is out of range: the model has n_layer={self.cfg.n_layer} "
                             f"(layers 0..{self.cfg.n_layer - 1})")

    def _embed(self, idx):
        if idx.ndim != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be integer token ids (batch, seq), got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}) (vocab_size), "
                             f"got min {int(idx.min())}, max {int(idx.max())}")
        x = self.embed(idx)
        if self.cfg.gemma:  # HF scales by sqrt(d) rounded to the model dtype
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype, device=x.device)
        return x

    def _run(self, x, layers, attention_mask, at=None):
        """Blocks `layers` on the residual x; rotary angles and masks are built once per call (Gemma 3: two
        of each, for its sliding and its global layers). at: positions the last block runs at (resid_post)."""
        cfg, T = self.cfg, x.shape[1]
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask must be (batch, seq) = {tuple(x.shape[:2])}, "
                             f"got {tuple(attention_mask.shape)}")
        rope = rotary_cos_sin(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scale, T, x.device, x.dtype)
        local_rope = rope if cfg.rope_local_theta is None else rotary_cos_sin(
            cfg.rotary_dim, cfg.rope_local_theta, 1.0, T, x.device, x.dtype)
        # no padding, no soft-cap, no window shorter than T: plain causal attention (None, see Attention)
        causal = attention_mask is None and cfg.attn_softcap is None
        full = None if causal else attention_allowed(T, attention_mask, None, x.device)
        sliding = full
        if cfg.sliding_layers and not (causal and T <= cfg.sliding_window):
            sliding = attention_allowed(T, attention_mask, cfg.sliding_window, x.device)
        for i in layers:
            slides = i in cfg.sliding_layers
            x = self.blocks[i](x, *(local_rope if slides else rope), sliding if slides else full,
                               at if i == layers[-1] else None)
        return x if at is None else x[:, 0]

    def _logits(self, x):
        logits = F.linear(self.ln_f(x), self.embed.weight if self.head is None else self.head.weight)
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits


# ----------------------------------------------------------------------------- loading

def read_json_object(file, hint=""):
    """The dict a JSON file holds; one clear line for a file that is not JSON or not an object
    (sae.py reads its cfg.json with it too)."""
    try:
        with open(file) as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}){hint}") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(c).__name__}{hint}")
    return c


def read_config(path):
    """Config from config.json, in the hub's spelling or in the one transformers >= 5 writes."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: not a Hugging Face model folder; {_HINT}")
    c = read_json_object(file, f"; {_HINT}")
    for key in _POSITIVE_INTS:  # a size written as "128" would fail deep inside torch
        if key in c and c[key] is not None and (type(c[key]) is not int or c[key] <= 0):
            raise ValueError(f"{file}: {key!r} must be a positive integer, got {c[key]!r}")

    def need(key):
        if key not in c:
            raise ValueError(f"{file}: missing key {key!r}")
        return c[key]

    names = c.get("architectures") or []
    name = next((name for name in names if name in _ARCHITECTURES), None)
    if name is None:
        raise ValueError(f"{file}: architectures={names} is not supported; supported: {list(_ARCHITECTURES)}")
    arch, multimodal = _ARCHITECTURES[name], name == _MULTIMODAL
    if multimodal:  # the text decoder's keys sit under text_config; special ids and tying at the top level
        if not isinstance(c.get("text_config"), dict):
            raise ValueError(f"{file}: {name} without a text_config")
        top = {key: c[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in c}
        c = {**c["text_config"], **top, "tie_word_embeddings": c.get("tie_word_embeddings", True)}
    if arch == "gemma3":  # fill Gemma 3's defaults first, so that none of Gemma-2's below applies
        c = {**_GEMMA3_DEFAULTS, **c}
        if c.get("use_bidirectional_attention"):
            raise ValueError(f"{file}: use_bidirectional_attention (an embedding model) is not supported")
    gemma = arch in ("gemma2", "gemma3")
    d, n_head, n_layer = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    head_dim = c.get("head_dim") or d // n_head  # GPT-NeoX has no head_dim key
    # Rotary: the hub says rotary_pct + rotary_emb_base (Pythia) or rope_theta (Gemma-2); transformers
    # >= 5 writes rope_parameters {rope_theta, partial_rotary_factor}. Missing keys get HF's defaults.
    # Gemma 3 has two bases: the hub says rope_theta (global layers) + rope_local_base_freq (sliding
    # layers) + rope_scaling (global layers only); transformers >= 5 writes rope_parameters keyed by
    # layer type, each entry {rope_type, rope_theta[, factor]}.
    if arch == "gemma3":
        rope = c.get("rope_parameters") or {}
        rope_global = rope.get("full_attention") or c.get("rope_scaling") or {}
        rope_local = rope.get("sliding_attention") or {}
        theta = rope_global.get("rope_theta", c["rope_theta"])
        local_theta = float(rope_local.get("rope_theta", c["rope_local_base_freq"]))
    else:
        rope = rope_global = rope_local = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
        local_theta = None
    kinds = [r.get("rope_type", r.get("type", "default")) for r in (rope_global, rope_local)]
    linear = arch == "gemma3" and kinds == ["linear", "default"] and "factor" in rope_global
    if kinds != ["default", "default"] and not linear:
        bad = rope_global if kinds[0] != "default" else rope_local
        raise ValueError(f"{file}: RoPE {bad} is not supported (only default RoPE, and linear scaling "
                         f"with a factor on Gemma 3's global layers)")
    scale = float(rope_global["factor"]) if linear else 1.0
    rotary_pct = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", 0.25)))
    if gemma:  # the hub file has both keys; HF's Gemma reads hidden_activation
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    else:
        act = c.get("hidden_act", "gelu")
    if act not in _GELU:
        raise ValueError(f"{file}: activation {act!r} is not supported; supported: {list(_GELU)}")
    # Gemma-2 hub files have no layer_types: HF's default slides on the even layers (0, 2, ...). Gemma 3's
    # without layer_types (gemma-3-1b) give sliding_window_pattern: every Nth layer is global, as in HF's
    # Gemma3TextConfig (which reads only that spelling; it writes _sliding_window_pattern beside layer_types).
    types = c.get("layer_types")
    if not types and arch == "gemma3":
        pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
        types = [("sliding_attention", "full_attention")[(i + 1) % pattern == 0] for i in range(n_layer)]
    types = types or [("sliding_attention", "full_attention")[i % 2] for i in range(n_layer)]
    if gemma and (len(types) != n_layer or not set(types) <= {"sliding_attention", "full_attention"}):
        raise ValueError(f"{file}: layer_types must list {n_layer} times sliding_attention or "
                         f"full_attention, got {types}")
    window = c.get("sliding_window", 4096) if gemma else None
    ids = {key: c.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {i for v in ids.values() for i in (v if isinstance(v, list) else [v]) if i is not None}
    return Config(
        arch=arch, n_layer=n_layer, d_model=d, n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head, head_dim=head_dim,
        d_mlp=need("intermediate_size"), vocab_size=need("vocab_size"),
        norm_eps=c.get("rms_norm_eps", 1e-6) if gemma else c.get("layer_norm_eps", 1e-5),
        rotary_dim=head_dim if gemma else int(head_dim * rotary_pct), rope_theta=float(theta),
        rope_local_theta=local_theta, rope_scale=scale, multimodal=multimodal,
        gelu_approximate=_GELU[act],
        attn_scale=c.get("query_pre_attn_scalar", 256) ** -0.5 if gemma else head_dim ** -0.5,
        attn_bias=c.get("attention_bias", not gemma),
        parallel_residual=not gemma and c.get("use_parallel_residual", True),
        tied_embeddings=c.get("tie_word_embeddings", gemma),
        attn_softcap=c.get("attn_logit_softcapping", 50.0) if gemma else None,
        final_softcap=c.get("final_logit_softcapping", 30.0) if gemma else None,
        sliding_window=window,
        sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else (),
        **{key: v[0] if isinstance(v, list) else v for key, v in ids.items()},
        special_ids=tuple(sorted(special)),
    )


def hf_tensor_names(cfg, name):
    """The HF tensor names our parameter `name` is read from (three for Gemma's fused q, k, v)."""
    module, param = name.rsplit(".", 1)
    layer = module.split(".")[1] if module.startswith("blocks.") else None
    template = _HF_MODULES[cfg.arch][re.sub(r"^blocks\.\d+", "blocks.{i}", module)]
    templates = template if isinstance(template, tuple) else (template,)
    return [t.format(i=layer) + "." + param for t in templates]


def text_decoder_name(name):
    """A Gemma3ForConditionalGeneration tensor name as Gemma3ForCausalLM names it (see _TEXT_PREFIXES)."""
    prefix = next((prefix for prefix in _TEXT_PREFIXES if name.startswith(prefix)), None)
    return name if prefix is None else _TEXT_PREFIXES[prefix] + name[len(prefix):]


def _open_safetensors(file):
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); "
                         f"it may be truncated: {_HINT}") from e


def checkpoint_files(path):
    """The safetensors files of an HF folder and {tensor name: file}."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map; {_HINT}")
        files = sorted({os.path.join(path, name) for name in weight_map.values()})
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = [os.path.join(path, "model.safetensors")]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                                f"(weights are read from safetensors only, never pickle); {_HINT}")
    where = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} (listed in {index}) not found; {_HINT}")
        with _open_safetensors(file) as f:
            where.update(dict.fromkeys(f.keys(), file))
    return files, where


def resolve_device(device):
    """A device setting as torch names it: "auto" is cuda when a GPU is visible, else cpu. A GPU
    this torch cannot use is refused here, in one line, not deep inside the first .to()."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU "
                             "(a CPU-only build, or no GPU visible): use --device=cpu or --device=auto")
        if (parsed.index or 0) >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA GPU(s) visible")
    return device


LLM_DTYPES = ("float32", "bfloat16", "auto")  # the llm_dtype settings of train.py and evaluate.py
# CPU features with native bf16 matrix instructions, as torch.cpu.get_capabilities() names them (public in
# torch 2.13): AMX and AVX512_BF16 on x86, FEAT_BF16 (BFMMLA) on arm64. Without them oneDNN emulates bf16
# GEMMs about 4x slower than fp32 (an AVX512 Xeon, (2048, 640) @ (640, 2048): 112 fp32 vs 22 bf16 GFLOP/s).
# torch.ops.mkldnn._is_mkldnn_bf16_supported() is no guide: it is True for plain AVX512.
_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")


def keep_freed_memory():
    """CPU runs (train.py, evaluate.py, bench.py): have glibc's malloc keep freed memory for
    reuse. By default every block above a few MB (a (B, F) activation, say) is a fresh mmap,
    handed back to the OS when freed, and the next step's block of the same size faults its pages
    in again one 4 KiB page at a time. On the 2-core test VM, with it, our SAE step ran 8-21%
    more tokens/s and dictionary_learning's 30-59% (bench.py with and without this call). jemalloc
    and tcmalloc, which PyTorch's CPU tuning guide recommends, keep memory like this anyway. Off
    glibc this is a no-op."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-4, 0)  # M_MMAP_MAX = 0: big blocks come from the heap like small ones ...
    mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ... and the heap is not handed back below 2 GiB free


def resolve_dtype(setting, arch, device):
    """The LLM dtype name ("float32" | "bfloat16") for an llm_dtype setting. "auto" is bfloat16 for Gemma
    (SAEBench runs Gemma-2 in bf16) on CUDA, and on a CPU only where it has native bf16 matrix instructions;
    float32 otherwise. bf16 moves Gemma 3 270M's residual stream by 0.4-0.6% per token (median relative
    error against fp32 at layers 3, 6 and 9, BOS excluded; 99th percentile 1.1-1.6%)."""
    if setting not in LLM_DTYPES:
        raise ValueError(f"llm_dtype must be one of {', '.join(LLM_DTYPES)}, got {setting!r}")
    if setting != "auto":
        return setting
    kind = torch.device(device).type
    if arch not in ("gemma2", "gemma3") or kind not in ("cuda", "cpu"):
        return "float32"
    if kind == "cuda":
        return "bfloat16"
    # an older torch without get_capabilities gets float32, the safe choice (--llm_dtype=bfloat16 still works)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return "bfloat16" if any(capabilities.get(f, False) for f in _BF16_CPU_FEATURES) else "float32"


def load(path, device="cpu", dtype=torch.float32):
    """Transformer from a local HF folder: config.json + model.safetensors, or shards + index.
    device "auto" means cuda when available; dtype is a torch dtype (or its name, e.g. "bfloat16")."""
    cfg = read_config(path)
    device = resolve_device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name: use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    files, where = checkpoint_files(path)
    stored = {name: name for name in where}  # name as hf_tensor_names spells it -> name in the file
    if cfg.multimodal:  # the text decoder only: vision tensors are never read
        stored = {text_decoder_name(name): name for name in where if not name.startswith(_VISION_PREFIXES)}
    with torch.device("meta"):  # no memory, no random init: load_state_dict(assign=True) fills it
        model = Transformer(cfg)
    sources = {name: hf_tensor_names(cfg, name) for name in model.state_dict()}
    wanted = {hf_name for names in sources.values() for hf_name in names}
    extra = sorted(stored[n] for n in stored if n not in wanted and not n.endswith(_SKIPPED_BUFFERS))
    if extra:
        raise ValueError(f"{where[extra[0]]}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected "
                         f"in all) for a {cfg.arch} model with n_layer={cfg.n_layer}: "
                         f"config.json and the weights do not match")
    state = {}
    for name, target in model.state_dict().items():
        rows = model.blocks[0].attn.sizes if len(sources[name]) == 3 else target.shape[:1]
        parts = []
        for hf_name, n_rows in zip(sources[name], rows):
            if hf_name not in stored:
                raise ValueError(f"tensor {hf_name!r} is missing from {', '.join(files)}")
            stored_name = stored[hf_name]
            with _open_safetensors(where[stored_name]) as f:
                t = f.get_tensor(stored_name)
            if not t.dtype.is_floating_point:  # a cast would turn quantised codes into nonsense
                raise ValueError(f"{where[stored_name]}: tensor {stored_name!r} is {t.dtype}; this project "
                                 f"reads floating-point weights only (no quantised checkpoints)")
            if t.shape != (n_rows, *target.shape[1:]):
                raise ValueError(f"{where[stored_name]}: tensor {stored_name!r} has shape {tuple(t.shape)}, "
                                 f"config.json implies {(n_rows, *target.shape[1:])}")
            parts.append(t.to(device=device, dtype=dtype))
        if cfg.arch == "gpt_neox" and ".qkv." in name:
            # HF's fused GPT-NeoX QKV is head-major, rows (head, q|k|v, dim); ours is (q|k|v, head, dim)
            parts = [parts[0].unflatten(0, (cfg.n_head, 3, cfg.head_dim)).transpose(0, 1).flatten(0, 2)]
        state[name] = torch.cat(parts).contiguous()
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False).eval()  # the LLM is frozen throughout this project
