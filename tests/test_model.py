"""model.py checked against transformers on tiny random GPT-NeoX, Gemma-2 and Gemma 3 checkpoints.

Each test builds a checkpoint with the make_hf_model fixture (tests/conftest.py), loads it with
model.load, and compares with transformers' own model loaded from the same folder.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

import model

VOCAB, T = 96, 12  # tiny vocab of the fixture's configs; T is longer than Gemma's sliding_window=4
ATOL = 1e-4

CASES = {  # name: (arch, config.json overrides in hub spelling)
    "neox-parallel-rotary0.25": ("gpt_neox", dict(use_parallel_residual=True, rotary_pct=0.25)),
    "neox-parallel-rotary1.0": ("gpt_neox", dict(use_parallel_residual=True, rotary_pct=1.0)),
    "neox-sequential-rotary0.25": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.25)),
    "neox-stored-float16": ("gpt_neox", dict(torch_dtype="float16")),  # as Pythia's hub files; we run fp32
    "neox-sequential-rotary1.0-tied": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=1.0,
                                                        tie_word_embeddings=True, rotary_emb_base=100)),
    "gemma2-gqa-window4": ("gemma2", dict()),  # 4 heads / 2 kv heads, default caps 50 / 30
    # caps that bind: with a larger init a missing or misplaced soft-cap changes every layer
    "gemma2-small-softcaps": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                             initializer_range=0.2)),
    "gemma2-no-softcap-sdpa": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                              num_key_value_heads=1, initializer_range=0.2)),
    "gemma2-layer-types": ("gemma2", dict(sliding_window=3, rope_theta=100.0, layer_types=[
        "full_attention", "sliding_attention", "sliding_attention"])),
    # layers sliding, global, sliding, global; window 4; 4 heads / 2 kv heads; RoPE bases 50 / 5000
    "gemma3-gqa-window4": ("gemma3", dict()),
    # gemma-3-1b's spelling: no layer_types, every 3rd layer global (sliding, sliding, global, sliding)
    "gemma3-window-pattern-mqa": ("gemma3", dict(layer_types=None, sliding_window_pattern=3,
                                                 num_key_value_heads=1)),
    # gemma-3-4b's: linear scaling of the global layers' RoPE (the larger init makes positions matter more)
    "gemma3-linear-rope": ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 8.0},
                                          initializer_range=0.2)),
}
NEOX, GEMMA, GEMMA3 = "neox-sequential-rotary0.25", "gemma2-small-softcaps", "gemma3-gqa-window4"


def hf_reference(folder, dtype=torch.float32, attention="eager"):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention).eval()


@torch.no_grad()
def hf_run(hf, idx, attention_mask=None):
    """HF logits, HF hidden_states, and the output of every decoder layer (via hooks: HF's last
    hidden_states entry has the final norm applied, so it is not the last block's residual)."""
    decoder = hf.gpt_neox if hasattr(hf, "gpt_neox") else getattr(hf.model, "language_model", hf.model)
    layers = decoder.layers
    block_outputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: block_outputs.append(
        out[0] if isinstance(out, tuple) else out)) for layer in layers]
    try:
        out = hf(idx, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits, out.hidden_states, block_outputs


def batches():
    """A packed batch (no mask), a right-padded one (rows of 12, 5 and 1 real tokens), and the same
    left-padded (not what our stages feed, but it checks the key mask: positions count the pads, as in
    HF without position_ids)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, VOCAB, (3, T), generator=g)
    lengths = torch.tensor([T, 5, 1])
    right = (torch.arange(T)[None, :] < lengths[:, None]).long()
    left = right.flip(1)
    return [(idx, None), (idx.masked_fill(right == 0, 0), right), (idx.masked_fill(left == 0, 0), left)]


def assert_close(ours, theirs, mask=None, atol=ATOL):
    if mask is not None:  # compare real positions only
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


@pytest.mark.parametrize("spelling", ["hub", "new"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_every_layer_match_transformers(make_hf_model, case, spelling):
    arch, overrides = CASES[case]
    folder = make_hf_model(arch, spelling=spelling, **overrides)
    m, hf = model.load(folder), hf_reference(folder)
    for idx, mask in batches():
        logits, hidden_states, block_outputs = hf_run(hf, idx, mask)
        with torch.no_grad():
            assert_close(m(idx, mask), logits, mask)
            for layer in range(m.cfg.n_layer):
                resid = m.resid_post(idx, layer, mask)
                assert_close(resid, block_outputs[layer], mask)
                if layer < m.cfg.n_layer - 1:
                    assert_close(resid, hidden_states[layer + 1], mask)


def test_hub_and_new_config_spellings_read_the_same(make_hf_model):
    for arch, overrides in CASES.values():
        hub = model.read_config(make_hf_model(arch, spelling="hub", **overrides))
        new = model.read_config(make_hf_model(arch, spelling="new", **overrides))
        assert hub == new


def test_transformers_last_hidden_state_is_after_the_final_norm(make_hf_model):
    """Why the parity test hooks the blocks: HF's hidden_states[-1] is ln_f(resid_post(n_layer - 1))."""
    folder = make_hf_model("gpt_neox")
    m, hf = model.load(folder), hf_reference(folder)
    idx, _ = batches()[0]
    _, hidden_states, _ = hf_run(hf, idx)
    with torch.no_grad():
        assert_close(m.ln_f(m.resid_post(idx, m.cfg.n_layer - 1)), hidden_states[-1])


@pytest.mark.parametrize("case", [NEOX, GEMMA, "gemma2-no-softcap-sdpa", GEMMA3, "gemma3-linear-rope"])
def test_forward_from_resid_post_gives_the_logits(make_hf_model, case):
    arch, overrides = CASES[case]
    m = model.load(make_hf_model(arch, **overrides))
    for idx, mask in batches():
        with torch.no_grad():
            logits = m(idx, mask)
            for layer in range(m.cfg.n_layer):
                resid = m.resid_post(idx, layer, mask)
                assert_close(m.forward_from(resid, layer, mask), logits, mask, atol=1e-6)


@pytest.mark.parametrize("case", ["neox-parallel-rotary0.25", "gemma2-no-softcap-sdpa", GEMMA3])
def test_unpadded_fast_path_equals_the_explicit_mask(make_hf_model, case):
    """Without attention_mask (and without a soft-cap) SDPA runs with is_causal=True instead of a
    mask; an all-ones attention_mask takes the masked path. Gemma's window 4 < T still builds its mask."""
    arch, overrides = CASES[case]
    m = model.load(make_hf_model(arch, **overrides))
    idx, _ = batches()[0]
    with torch.no_grad():
        for layer in range(m.cfg.n_layer):
            assert_close(m.resid_post(idx, layer), m.resid_post(idx, layer, torch.ones_like(idx)), atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_positions_read_the_residual_at_one_token_per_row(make_hf_model, case):
    """resid_post(..., positions) runs its last block at one query per row: the same values as the
    whole residual read there, with and without padding (row 2 of the padded batch reads its one
    real token, row 1 a token before its last), at every layer, the first included."""
    arch, overrides = CASES[case]
    m = model.load(make_hf_model(arch, **overrides))
    for (idx, mask), positions in zip(batches()[:2], ([T - 1, 6, 0], [T - 1, 3, 0])):
        with torch.no_grad():
            for layer in range(m.cfg.n_layer):
                whole = m.resid_post(idx, layer, mask)[torch.arange(3), positions]
                at = m.resid_post(idx, layer, mask, torch.tensor(positions))
                assert at.shape == (3, m.cfg.d_model)
                assert_close(at, whole, atol=1e-5)
    with pytest.raises(ValueError, match="one index in"):
        m.resid_post(idx, 0, mask, torch.tensor([T, 0, 0]))


@pytest.mark.parametrize("case", [NEOX, GEMMA, "gemma2-no-softcap-sdpa", GEMMA3])
def test_right_padding_leaves_real_tokens_unchanged_and_padding_finite(make_hf_model, case):
    arch, overrides = CASES[case]
    m = model.load(make_hf_model(arch, **overrides))
    idx, mask = batches()[1]
    with torch.no_grad():
        padded = m(idx, mask)
        alone = m(idx[1:2, :5])  # row 1 has 5 real tokens; Gemma's padded queries 8.. see no real key
    assert torch.isfinite(padded).all()
    assert_close(padded[1, :5], alone[0], atol=1e-5)


@pytest.mark.parametrize("case", [NEOX, GEMMA, GEMMA3])
def test_bfloat16_matches_transformers_in_bfloat16(make_hf_model, case):
    """bf16 rounds where HF rounds (RMSNorm and softmax in fp32, rotary angles cast to bf16, ...)."""
    arch, overrides = CASES[case]
    folder = make_hf_model(arch, **overrides)
    m = model.load(folder, device="auto", dtype="bfloat16")  # names work as well as torch dtypes
    hf = hf_reference(folder, torch.bfloat16, "eager" if m.cfg.attn_softcap else "sdpa")  # as our path
    idx, mask = batches()[1]
    logits, _, block_outputs = hf_run(hf, idx, mask)
    with torch.no_grad():
        ours = m(idx, mask)
        for layer in range(m.cfg.n_layer):  # within half a bf16 step of the largest value
            ref = block_outputs[layer]
            atol = 2**-9 * ref.abs().max().item()
            assert_close(m.resid_post(idx, layer, mask).float(), ref.float(), mask, atol=atol)
        full = model.load(folder)(idx, mask)
        resid_fp32 = m.resid_post(idx, 0, mask).float()  # e.g. an SAE reconstruction in fp32
        assert torch.equal(m.forward_from(resid_fp32, 0, mask), ours)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert_close(ours.float(), logits.float(), mask, atol=2**-9 * logits.abs().max().item())
    assert_close(ours.float(), full, mask, atol=0.05 * full.abs().max().item())  # loosely the fp32 result


# ----------------------------------------------------------------------------- Gemma 3 configs and layouts

def assert_matches_transformers(m, hf):
    """Logits and every block's output, on every batch of batches()."""
    for idx, mask in batches():
        logits, _, block_outputs = hf_run(hf, idx, mask)
        with torch.no_grad():
            assert_close(m(idx, mask), logits, mask)
            for layer in range(m.cfg.n_layer):
                assert_close(m.resid_post(idx, layer, mask), block_outputs[layer], mask)


def test_gemma3_keys_left_out_take_gemma3_defaults_not_gemma2s(make_hf_model):
    """Hub Gemma 3 files leave out keys at transformers' defaults (global RoPE base 1e6, local 1e4, no
    soft-caps, every 6th layer global, query_pre_attn_scalar 256, window 4096); Gemma-2's differ."""
    folder = make_hf_model("gemma3", num_hidden_layers=6, layer_types=None)
    shape_keys = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({key: config[key] for key in shape_keys}))
    m = model.load(folder)
    cfg = m.cfg
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert cfg.attn_softcap is None and cfg.final_softcap is None
    assert (cfg.sliding_layers, cfg.sliding_window, cfg.attn_scale) == ((0, 1, 2, 3, 4), 4096, 256 ** -0.5)
    assert m.special_ids == (0, 1, 2)
    assert_matches_transformers(m, hf_reference(folder))


def test_gemma3_sliding_window_pattern_spellings(make_hf_model):
    """Without layer_types every Nth layer is global: N from sliding_window_pattern (gemma-3-1b's file),
    else from _sliding_window_pattern (what transformers writes beside layer_types), else 6."""
    folder = make_hf_model("gemma3")  # 4 layers
    config = json.loads((folder / "config.json").read_text())
    del config["layer_types"], config["_sliding_window_pattern"]
    for pattern, sliding in [({}, (0, 1, 2, 3)), ({"sliding_window_pattern": 3}, (0, 1, 3)),
                             ({"_sliding_window_pattern": 2}, (0, 2))]:
        (folder / "config.json").write_text(json.dumps({**config, **pattern}))
        assert model.read_config(folder).sliding_layers == sliding


def test_multimodal_gemma3_checkpoint_reads_its_text_decoder(tmp_path):
    """Gemma3ForConditionalGeneration (gemma-3-4b and up): the decoder's config under text_config, as sparse
    as gemma-3-4b's (defaults fill the rest; linear RoPE scaling), eos ids at the top level, the weights under
    a language-model prefix beside a vision tower. We read the decoder and match transformers on text."""
    text = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                sliding_window=4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", eos_token_id=[1, 7],
                  mm_tokens_per_image=4, text_config=text, vision_config=vision)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(Gemma3Config.from_pretrained(hub))
    with torch.no_grad():  # random norm weights, as make_hf_model
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(hub)  # as on the hub: language_model.model.*, vision_tower.*, multi_modal_projector.*
    (hub / "config.json").write_text(json.dumps(config))
    tensors = load_file(hub / "model.safetensors")
    assert any(name.startswith("vision_tower.") for name in tensors)
    m = model.load(hub)
    assert m.cfg.multimodal and m.cfg.rope_scale == 8.0 and m.special_ids == (0, 1, 2, 7)
    hf = Gemma3ForConditionalGeneration.from_pretrained(hub, attn_implementation="eager").eval()
    assert_matches_transformers(m, hf)

    # the same weights under transformers' in-memory names: model.language_model.*, model.vision_tower.*, ...
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text(json.dumps(config))
    save_file({"model." + name.replace("language_model.model.", "language_model.", 1): t
               for name, t in tensors.items()}, renamed / "model.safetensors")
    idx, mask = batches()[1]
    with torch.no_grad():
        assert torch.equal(model.load(renamed)(idx, mask), m(idx, mask))


def test_sharded_checkpoint_with_index_loads(make_hf_model):
    folder = make_hf_model("gemma2", spelling="new", shard_size="20KB", **CASES[GEMMA][1])
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("model-*.safetensors"))) > 1
    m, hf = model.load(folder), hf_reference(folder)
    idx, mask = batches()[1]
    with torch.no_grad():
        assert_close(m(idx, mask), hf_run(hf, idx, mask)[0], mask)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name} \(listed in .*index\.json\) not found"):
        model.load(folder)


def test_old_gpt_neox_buffers_in_the_checkpoint_are_skipped(make_hf_model):
    folder = make_hf_model("gpt_neox")
    tensors = load_file(folder / "model.safetensors")
    expected = model.load(folder)(batches()[0][0])
    for name in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
        tensors[f"gpt_neox.layers.0.{name}"] = torch.ones(2)
    save_file(tensors, folder / "model.safetensors")
    assert torch.equal(model.load(folder)(batches()[0][0]), expected)


# ----------------------------------------------------------------------------- bad input

def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_tensor_names_the_tensor_and_file(make_hf_model):
    folder = make_hf_model("gpt_neox")
    tensors = load_file(folder / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(tensors, folder / "model.safetensors")
    missing = r"'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias' is missing from .*model\.safetensors"
    with pytest.raises(ValueError, match=missing):
        model.load(folder)


def test_shape_mismatch_names_the_tensor_and_file(make_hf_model):
    folder = make_hf_model("gemma2")
    edit_config(folder, intermediate_size=48)
    wrong_shape = r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(64, 32\)"
    with pytest.raises(ValueError, match=wrong_shape):
        model.load(folder)


def test_unexpected_tensor_is_an_error(make_hf_model):
    folder = make_hf_model("gpt_neox")
    edit_config(folder, num_hidden_layers=2)  # the file still holds layer 2
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected tensor 'gpt_neox\.layers\.2\."):
        model.load(folder)


@pytest.mark.parametrize("arch, rope", [
    ("gemma3", dict(rope_scaling={"rope_type": "yarn", "factor": 8.0})),
    ("gemma3", dict(rope_parameters={  # transformers 5 spelling; linear scaling on the sliding layers
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})),
    ("gemma2", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}))])
def test_unsupported_rope_is_one_clear_error(make_hf_model, arch, rope):
    folder = make_hf_model(arch)
    edit_config(folder, **rope)
    with pytest.raises(ValueError, match=r"config\.json: RoPE .* is not supported \(only default RoPE"):
        model.load(folder)


def test_truncated_safetensors_file_names_the_file(make_hf_model):
    folder = make_hf_model("gpt_neox")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        model.load(folder)


def test_unknown_architecture_names_it_and_the_supported_ones(make_hf_model):
    folder = make_hf_model("gpt_neox")
    edit_config(folder, architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=r"config\.json.*LlamaForCausalLM") as error:
        model.load(folder)
    assert "GPTNeoXForCausalLM" in str(error.value) and "Gemma2ForCausalLM" in str(error.value)


def test_missing_folder_or_weights_point_to_prepare(make_hf_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/config\.json.*prepare\.py --model="):
        model.load(tmp_path / "nowhere")
    folder = make_hf_model("gpt_neox")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*prepare\.py --model="):
        model.load(folder)


def test_integer_weights_are_refused_not_cast(make_hf_model):
    folder = make_hf_model("gpt_neox")
    tensors = load_file(folder / "model.safetensors")
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    tensors[name] = tensors[name].round().to(torch.int8)  # e.g. a quantised checkpoint
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' is torch\.int8"):
        model.load(folder)


def test_bad_config_json_names_the_file(make_hf_model):
    folder = make_hf_model("gpt_neox")
    edit_config(folder, hidden_size="32")  # a string where a size belongs
    with pytest.raises(ValueError, match=r"config\.json: 'hidden_size' must be a positive integer, got '32'"):
        model.load(folder)
    (folder / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        model.load(folder)


def test_a_gpu_this_torch_cannot_use_is_one_clear_error():
    assert model.resolve_device("cpu") == "cpu"
    assert model.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        model.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU.*--device=cpu"):
            model.resolve_device("cuda")


@pytest.mark.parametrize("cpu_features, cpu_dtype", [
    ({"avx512_f": True}, "float32"),             # AVX512 without bf16: bf16 GEMMs emulated (slow)
    ({"avx512_f": True, "avx512_bf16": True}, "bfloat16"),
    ({"amx_tile": True, "amx_bf16": True}, "bfloat16"),
    ({"architecture": "arm64", "bf16": True}, "bfloat16"),
])
def test_auto_dtype_is_bf16_for_gemma_on_cuda_and_on_cpus_with_bf16_units(monkeypatch, cpu_features,
                                                                          cpu_dtype):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu_features)
    assert model.resolve_dtype("auto", "gemma3", "cpu") == cpu_dtype
    assert model.resolve_dtype("auto", "gemma2", "cpu") == cpu_dtype
    assert model.resolve_dtype("auto", "gpt_neox", "cpu") == "float32"  # SAEBench runs Pythia in fp32
    for arch in ("gemma2", "gemma3"):
        assert model.resolve_dtype("auto", arch, "cuda:1") == "bfloat16"  # a name: no GPU needed
    assert model.resolve_dtype("auto", "gpt_neox", "cuda") == "float32"
    for setting in ("float32", "bfloat16"):  # an explicit setting is kept everywhere
        assert model.resolve_dtype(setting, "gemma3", "cpu") == setting
        assert model.resolve_dtype(setting, "gpt_neox", "cuda") == setting
    with pytest.raises(ValueError, match="llm_dtype must be one of float32, bfloat16, auto, got 'fp16'"):
        model.resolve_dtype("fp16", "gemma3", "cpu")


def test_layer_and_token_ids_out_of_range(make_hf_model):
    m = model.load(make_hf_model("gpt_neox"))  # 3 layers, vocab 96
    idx = torch.tensor([[5, 6, 7]])
    for layer in (-1, 3):
        with pytest.raises(ValueError, match="n_layer=3"):
            m.resid_post(idx, layer)
        with pytest.raises(ValueError, match="n_layer=3"):
            m.forward_from(torch.zeros(1, 3, 32), layer)
    for bad in (96, -1):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
            m(torch.tensor([[5, bad]]))


# ----------------------------------------------------------------------------- special ids

def test_pythia_special_ids_and_valid_mask(make_hf_model):
    m = model.load(make_hf_model("gpt_neox"))  # Pythia: bos = eos = 0, no pad_token_id
    assert (m.cfg.bos_token_id, m.cfg.eos_token_id, m.cfg.pad_token_id) == (0, 0, None)
    assert m.special_ids == (0,)
    idx = torch.tensor([[0, 5, 6, 0, 7, 1],   # BOS, text, EOS, text, id 1 (<|padding|>, the mask token)
                        [0, 8, 9, 1, 1, 1]])  # last three are padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert m.valid_mask(idx).tolist() == [[False, True, True, False, True, True],
                                          [False, True, True, True, True, True]]
    assert m.valid_mask(idx, mask).tolist() == [[False, True, True, False, True, True],
                                                [False, True, True, False, False, False]]


def test_gemma_special_ids_and_valid_mask(make_hf_model):
    m = model.load(make_hf_model("gemma2"))  # Gemma: pad 0, eos 1, bos 2; <mask> = 4 is ordinary
    assert (m.cfg.bos_token_id, m.cfg.eos_token_id, m.cfg.pad_token_id) == (2, 1, 0)
    assert m.special_ids == (0, 1, 2)
    idx = torch.tensor([[2, 4, 9, 1, 0, 0]])
    assert m.valid_mask(idx).tolist() == [[False, True, True, False, False, False]]


def test_gemma3_special_ids(make_hf_model):
    m = model.load(make_hf_model("gemma3", eos_token_id=[1, 7]))  # Gemma 3 -it files list several eos ids
    assert (m.cfg.bos_token_id, m.cfg.eos_token_id, m.cfg.pad_token_id) == (2, 1, 0)
    assert m.special_ids == (0, 1, 2, 7)


def test_a_list_of_eos_ids_is_all_special(make_hf_model):
    m = model.load(make_hf_model("gemma2", eos_token_id=[1, 7]))
    assert m.cfg.eos_token_id == 1 and m.special_ids == (0, 1, 2, 7)
