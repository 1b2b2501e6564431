"""
Prepare what every later stage reads (design brief, "data products"):

  1. model_dir: a model in the Hugging Face hub layout (config.json, model.safetensors or shards
     + model.safetensors.index.json, tokenizer.json);
  2. tokens_dir: a corpus tokenized with that model's tokenizer into flat token files train.bin
     and val.bin (np.memmap; uint16 when the vocabulary fits, else uint32; every document
     followed by EOS) and meta.json, written last.

    python prepare.py                        # offline default: a tiny RANDOM GPT-NeoX and the
                                             # Python standard library as text (~15 s on CPU)
    python prepare.py configs/pythia160m.py  # Pythia-160M-deduped + 500M tokens of the Pile
    python prepare.py configs/gemma2_2b.py   # gated: accept the license on the hub, set HF_TOKEN
    python prepare.py --model=EleutherAI/pythia-70m-deduped --revision=step3000 \\
        --model_dir=data/p70m/model --dataset=my_docs.jsonl --tokens_dir=data/p70m/tokens

`model` is a hub repo id, a local folder (copied into model_dir) or "tiny". `dataset` is a hub
dataset repo id (its files matching data_files, fetched one at a time in sorted order), a local
.txt/.jsonl/.jsonl.zst/.parquet file or folder of them, or "stdlib".

Both steps are idempotent: complete outputs (for tokens: with a meta.json that matches the
settings) make a rerun a no-op that says so, without touching the network. New token files are
written beside the old ones (*.tmp) and swapped in at the end, so a failed or interrupted
tokenization leaves the previous tokens_dir as it was; the next run starts it over from the
beginning (there is no mid-file resume).
"""
import contextlib
import fnmatch
import hashlib
import importlib
import io
import itertools
import json
import os
import pickle
import shutil
import sys
import sysconfig
import time

import huggingface_hub
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

import configurator

# model
model = "tiny"                  # hub repo id, local folder, or "tiny" (random GPT-NeoX, offline)
model_dir = "data/tiny/model"   # the local hub-layout folder every stage loads the model from
revision = "main"               # hub branch, tag or commit (Pythia checkpoints: "step143000")
# text (paper.md §5, default 8: monology/pile-uncopyrighted, field "text")
dataset = "stdlib"              # hub dataset repo id, local file or folder, or "stdlib" (offline)
data_files = "train/*"          # hub dataset: the repo files to read (glob), in sorted order
text_field = "text"             # the field holding a document in .jsonl and .parquet files
tokens_dir = "data/tiny/tokens"
max_tokens = 3_000_000          # stop after this many train tokens (the paper: 500M)
val_fraction = 0.01             # share of the tokens (whole documents) written to val.bin
seed = 0                        # the tiny model's random weights

_MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]
_TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
_TINY_CONFIG = {  # hub spelling, as in Pythia's config.json (models.md), scaled down
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
    return Tokenizer.from_file(path)


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
    loops: a memmap held for hours keeps its pages resident (nanoGPT, training.md §4)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta_path = os.path.join(tokens_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run prepare.py (with your config) to "
                                f"tokenize a corpus into {tokens_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
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


def _write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    _replace(path + ".tmp", path)


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


def model_is_complete(model_dir):
    """config.json, tokenizer.json and every weight file (all shards the index names)."""
    def have(name):
        return os.path.isfile(os.path.join(model_dir, name))
    if not (have("config.json") and have("tokenizer.json")):
        return False
    if have("model.safetensors"):
        return True
    if have("model.safetensors.index.json"):
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            return all(have(shard) for shard in set(json.load(f)["weight_map"].values()))
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
        raise ValueError(f"refusing to load {bin_path}: it holds more than tensors, and running "
                         f"arbitrary pickled code is not something a weights file should need "
                         f"({str(e).splitlines()[0]})") from None
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
    _write_json(os.path.join(model_dir, "config.json"), _TINY_CONFIG)
    path = os.path.join(model_dir, "model.safetensors")
    save_file(tiny_state_dict(seed), path + ".tmp", metadata={"format": "pt"})
    _replace(path + ".tmp", path)


def prepare_model(cfg):
    if model_is_complete(cfg.model_dir):
        print(f"model: {cfg.model_dir} already holds config.json, weights and tokenizer.json; "
              "nothing to do (delete the folder to fetch it again)")
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
        if path.endswith(".zst"):  # the Pile's shards; they may use long windows
            zstandard = _optional_import("zstandard", "zstandard", path)
            decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
            lines = io.TextIOWrapper(decompressor.stream_reader(open(path, "rb")), encoding="utf-8")
        else:
            lines = open(path, encoding="utf-8")
        with lines:
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
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
    elif os.path.isfile(dataset):
        yield from read_file_documents(dataset, text_field)
    elif os.path.isdir(dataset):
        paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(dataset)
                       for f in files if f.endswith(_TEXT_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"{dataset} holds no {'/'.join(_TEXT_SUFFIXES)} files")
        for path in paths:
            yield from read_file_documents(path, text_field)
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
    (paper.md §5, default 9). encode_batch tokenizes a batch of documents on all cores."""
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


def prepare_tokens(cfg, tokenizer):
    with open(os.path.join(cfg.model_dir, "config.json")) as f:
        config = json.load(f)
    eos_token_id = config.get("eos_token_id")
    eos_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    if not isinstance(eos_token_id, int):
        raise ValueError(f"{cfg.model_dir}/config.json: eos_token_id is {eos_token_id!r}; "
                         "documents need an EOS id to separate them")
    tokenizer_path = os.path.join(cfg.model_dir, "tokenizer.json")
    with open(tokenizer_path, "rb") as f:
        tokenizer_sha256 = hashlib.sha256(f.read()).hexdigest()
    source = f"stdlib {sysconfig.get_paths()['stdlib']}" if cfg.dataset == "stdlib" else cfg.dataset
    # What the token files depend on; a rerun with the same values has nothing to do. (Models
    # that share a tokenizer, such as the Pythia sizes, can share one tokens_dir.)
    settings = {"source": source, "data_files": cfg.data_files, "text_field": cfg.text_field,
                "tokenizer_sha256": tokenizer_sha256, "eos_token_id": eos_token_id,
                "max_tokens": cfg.max_tokens, "val_fraction": cfg.val_fraction}
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
    tokens, documents = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    start = last_print = time.time()
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
    _write_json(meta_path, {**settings, "model": cfg.model, "tokenizer": tokenizer_path,
                            "vocab_size": vocab_size, "dtype": dtype,
                            "bos_token_id": config.get("bos_token_id"),
                            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
                            "documents": documents})
    elapsed = time.time() - start
    print(f"tokens: wrote {tokens['train']:,} train + {tokens['val']:,} val tokens ({dtype}, "
          f"{sum(documents.values()):,} documents) to {cfg.tokens_dir} in {elapsed:.1f} s, "
          f"{sum(tokens.values()) / elapsed:,.0f} tok/s")


def main(argv):
    cfg = configurator.configure(globals(), argv, __doc__)
    if not 0 < cfg.val_fraction < 1 or cfg.max_tokens < 1:
        raise ValueError(f"need 0 < val_fraction < 1 and max_tokens >= 1, got "
                         f"{cfg.val_fraction} and {cfg.max_tokens}")
    print("prepare.py: " + ", ".join(f"{k}={v!r}" for k, v in vars(cfg).items()))
    prepare_model(cfg)
    prepare_tokens(cfg, load_tokenizer(cfg.model_dir))
    if cfg.model == "tiny":
        print("NOTE: the tiny model's weights are RANDOM, so every number it produces (losses, "
              "SAE metrics) means nothing; it only lets each stage run offline in minutes. "
              "The real runs are configs/pythia160m.py and configs/gemma2_2b.py.")


if __name__ == "__main__":
    configurator.run(main)
