"""Shared fixtures: tiny Hugging Face checkpoints written by transformers (a test-only dependency).

    def test_something(make_hf_model):
        folder = make_hf_model("gpt_neox", use_parallel_residual=False)   # hub-spelled config.json
        folder = make_hf_model("gemma2", spelling="new", shard_size="20KB", tokenizer=True)

and the tiny random model every pipeline test trains on (`tiny`), train.py's fast settings for it
(fast_settings) and one run of them (`tiny_run`).
"""
import itertools
import json
import os

import pytest
import torch

# The seconds-long random model every pipeline test runs on (the scripts' defaults are Gemma 3 270M)
TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")

# Tiny models: extra threads only spin on a shared machine (one thread ran tests/test_model.py 6x faster).
torch.set_num_threads(1)

# The files with the most work, slowest first (by their tests' seconds in one -n 2 run): pytest-xdist
# hands whole files to its workers in collection order, and a long file started last runs on alone.
SLOW_FILES_FIRST = ("test_gguf.py", "test_failures.py", "test_train.py", "test_evaluate.py", "test_sae.py",
                    "test_cache.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# Tiny configs written as the hub's config.json files are (EleutherAI/pythia-*, google/gemma-2-*), scaled down.
TINY_HUB_CONFIGS = {
    "gpt_neox": dict(
        architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", vocab_size=96, hidden_size=32,
        num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        initializer_range=0.02, torch_dtype="float32"),
    "gemma2": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=96, hidden_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.02, torch_dtype="float32"),
    # as gemma-3-270m's: layer_types plus _sliding_window_pattern, two RoPE bases, caps null; the bases
    # are far apart (and not HF's defaults 1e6 / 1e4) so that swapping or defaulting them shows
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=96, hidden_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, attn_logit_softcapping=None,
        final_logit_softcapping=None, sliding_window=4, _sliding_window_pattern=2,
        layer_types=["sliding_attention", "full_attention"] * 2, rope_theta=50.0, rope_local_base_freq=5000.0,
        rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, initializer_range=0.02, torch_dtype="float32"),
}
_SPECIAL_TOKENS = {"gpt_neox": ["<|endoftext|>", "<|padding|>"],
                   "gemma2": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
                   "gemma3": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]}
_WORDS = "the of and to in is was for on that with as by at from it an be this are or his".split()


def write_tokenizer(folder, arch):
    """A word-level tokenizer.json: the architecture's special tokens at their real ids, then words
    (unknown words -> <unk>: Gemma's id 3; for GPT-NeoX an extra last entry)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokens = _SPECIAL_TOKENS[arch] + _WORDS + ([] if "<unk>" in _SPECIAL_TOKENS[arch] else ["<unk>"])
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(_SPECIAL_TOKENS[arch])
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """configs/tiny.py's model and tokens (prepare.py: tiny random GPT-NeoX + stdlib tokens), shrunk."""
    import prepare
    folder = tmp_path_factory.mktemp("tiny")
    prepare.main([TINY_CONFIG, f"--model_dir={folder}/model", f"--tokens_dir={folder}/tokens", "--max_tokens=300000",
                  "--eval_sets=[]"])
    return folder


def fast_settings(tiny, out_dir, *overrides):
    """train.py's command line for a seconds-long run on the `tiny` fixture: 30 steps of 256 tokens,
    SAEs k4 and k8 of 256 latents, a checkpoint every 10 steps."""
    return [TINY_CONFIG, f"--model_dir={tiny}/model", f"--tokens_dir={tiny}/tokens", f"--out_dir={out_dir}",
            "--ctx_len=64", "--llm_batch_rows=8", "--buffer_tokens=2048", "--batch_size=256",
            "--total_tokens=7680", "--ks=[4, 8]", "--dict_size=256", "--warmup_steps=5",
            "--threshold_start=5", "--dead_tokens=2560", "--log_interval=10", "--ckpt_interval=10",
            "--scale_tokens=1024", *overrides]


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    """The folder of one uninterrupted train.py run with fast_settings and nothing changed: the
    reference that killed-and-resumed and cached runs of the same settings must equal bit for bit.
    Shared by the tests of a session: read it, never write into it."""
    import train
    folder = tmp_path_factory.mktemp("tiny_run") / "run"
    train.main(fast_settings(tiny, folder))
    return folder


@pytest.fixture
def make_hf_model(tmp_path):
    """make_hf_model(arch, spelling="hub", shard_size=None, tokenizer=False, seed=0, **config) -> folder.

    Builds a tiny random GPTNeoXForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM from
    TINY_HUB_CONFIGS[arch] updated with `config` (hub key spelling), saves it with save_pretrained (safetensors; shards plus
    model.safetensors.index.json when shard_size, e.g. "20KB"), and leaves config.json either as the
    hub spells it (spelling="hub") or as transformers writes it (spelling="new": rope_parameters,
    layer_types, ...). 1-D parameters (norm weights, biases) are randomized too, so that a wrong
    norm or a dropped bias changes the output. Load the reference with from_pretrained(folder).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    counter = itertools.count()

    def make(arch, spelling="hub", shard_size=None, tokenizer=False, seed=0, **config):
        assert spelling in ("hub", "new")
        folder = tmp_path / f"{arch}_{next(counter)}"
        folder.mkdir()
        hub_config = {**TINY_HUB_CONFIGS[arch], **config}
        (folder / "config.json").write_text(json.dumps(hub_config, indent=2))
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
        hf.save_pretrained(folder, max_shard_size=shard_size or "1GB")
        if spelling == "hub":
            (folder / "config.json").write_text(json.dumps(hub_config, indent=2))
        if tokenizer:
            write_tokenizer(folder, arch)
        return folder

    return make
