"""prepare.py by example: tokenizing local and hub corpora into token files, the helpers other
stages import, and the model folder (tiny default, hub download, .bin conversion, gated repos).
The hub is never contacted: huggingface_hub's functions are replaced by fakes."""
import ast
import importlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import prepare  # noqa: E402
from conftest import TINY_CONFIG  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

DOCS = [f"Document {i}: " + text for i, text in enumerate([
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "naïve café, Übermaß — unicode ✓ and emoji 🙂",
    "import os\nprint(os.getcwd())\n",
    "Short.",
    "A longer paragraph about sparse autoencoders, masks and tokens. " * 5,
    "for i in range(10):\n    print(i * i)\n",
    "Tabs\tand\ttrailing spaces   \n\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "class Point:\n    x: int\n    y: int\n",
    "Quotes 'single' and \"double\" and `back`.",
    "The last document.",
])]


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tokenizer():
    return prepare.train_tiny_tokenizer(DOCS * 10)


def make_model_dir(folder, tokenizer, eos=0, bos=0):
    """A hub-layout folder: prepare.py reads only tokenizer.json and config.json's ids."""
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "bos_token_id": bos}, f)
    save_file({"w": torch.zeros(1)}, os.path.join(folder, "model.safetensors"))
    return str(folder)


def run(model_dir, dataset, tokens_dir, *overrides):
    prepare.main([TINY_CONFIG, f"--model={model_dir}", f"--model_dir={model_dir}", f"--dataset={dataset}",
                  f"--tokens_dir={tokens_dir}", "--eval_sets=[]", *overrides])


def documents_in(ids, eos=0):
    """Split a token file at EOS into documents (lists of ids); every document must end in EOS."""
    docs, current = [], []
    for token in ids.tolist():
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    assert current == [], "a document without its EOS"
    return docs


def assert_partition(tokenizer, texts, tokens_dir, eos=0):
    """train.bin and val.bin hold every text's exact ids + EOS, each in exactly one of them, in
    corpus order, and val keeps to its share."""
    train, meta = prepare.open_tokens(tokens_dir, "train")
    val, _ = prepare.open_tokens(tokens_dir, "val")
    train_docs, val_docs = documents_in(train, eos), documents_in(val, eos)
    t = v = 0
    for text in texts:
        ids = encode(tokenizer, text)
        if t < len(train_docs) and train_docs[t] == ids:
            t += 1
        elif v < len(val_docs) and val_docs[v] == ids:
            v += 1
        else:
            pytest.fail(f"document {text!r} is in neither split (or out of order)")
    assert (t, v) == (len(train_docs), len(val_docs))
    assert 0 < len(val) <= meta["val_fraction"] * (len(train) + len(val))
    return train, val, meta


def test_local_folder_of_txt_and_jsonl(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS[0])
    with open(corpus / "b.jsonl", "w") as f:  # a blank line is skipped, other fields ignored
        for text in DOCS[1:10]:
            f.write(json.dumps({"text": text, "meta": {"id": 1}}) + "\n\n")
    (corpus / "sub" / "c.txt").write_text(DOCS[10])
    (corpus / "notes.md").write_text("not part of the corpus")
    model_dir = make_model_dir(tmp_path / "model", tokenizer)

    run(model_dir, corpus, tmp_path / "tokens", "--val_fraction=0.3")

    train, val, meta = assert_partition(tokenizer, DOCS[:11], tmp_path / "tokens")
    assert train.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["eos_token_id"] == 0 and meta["bos_token_id"] == 0
    assert meta["vocab_size"] == tokenizer.get_vocab_size()
    assert meta["source"] == str(corpus)
    assert meta["tokenizer"] == os.path.join(model_dir, "tokenizer.json")
    assert sum(meta["documents"].values()) == 11


def test_single_jsonl_file_exact_ids_and_max_tokens(tmp_path, tokenizer):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    model_dir = make_model_dir(tmp_path / "model", tokenizer, eos=1, bos=2)  # Gemma-like ids

    run(model_dir, corpus, tmp_path / "all", "--text_field=body", "--val_fraction=0.25")
    full_train, full_val, _ = assert_partition(tokenizer, DOCS, tmp_path / "all", eos=1)

    # A cap cuts train at exactly max_tokens; what comes before the cap is unchanged.
    run(model_dir, corpus, tmp_path / "capped", "--text_field=body", "--val_fraction=0.25",
        "--max_tokens=100")
    train, meta = prepare.open_tokens(tmp_path / "capped", "train")
    val, _ = prepare.open_tokens(tmp_path / "capped", "val")
    assert meta["train_tokens"] == 100 and meta["eos_token_id"] == 1 and meta["bos_token_id"] == 2
    assert train.tolist() == full_train[:100].tolist()
    assert val.tolist() == full_val[:len(val)].tolist()


def word_level_tokenizer(vocab_size):
    """Word i is "w{i}" with id i; id 0 is <|endoftext|>."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return word_level


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (65537, np.uint32)])
def test_dtype_is_uint16_only_when_every_id_fits(tmp_path, vocab_size, dtype):
    word_level = word_level_tokenizer(vocab_size)
    top = vocab_size - 1
    texts = [f"w{top} w1 w2", "w5 w6", f"w3 w{top - 1} w{top}", "w7", "w8 w9", "w10 w11 w12"]
    corpus = tmp_path / "corpus"  # a folder of .txt files, one document each
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text)
    model_dir = make_model_dir(tmp_path / "model", word_level)

    run(model_dir, corpus, tmp_path / "tokens", "--val_fraction=0.3")

    train, val, meta = assert_partition(word_level, texts, tmp_path / "tokens")
    assert train.dtype == dtype and val.dtype == dtype and meta["dtype"] == np.dtype(dtype).name
    assert top in train.tolist() + val.tolist()  # the largest id survives the round trip


def test_no_bos_inside_token_files_even_if_the_tokenizer_adds_one(tmp_path):
    # Gemma's tokenizer prepends <bos> by itself; rows get their BOS in train.py instead
    # (a BOS only at row start, see the README), so prepare.py must not let it in between documents.
    gemma_like = word_level_tokenizer(100)
    gemma_like.add_special_tokens(["<bos>"])  # id 100
    gemma_like.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 100)])
    assert gemma_like.encode("w5").ids == [100, 5]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}"}) + "\n" for i in range(1, 40)))
    run(make_model_dir(tmp_path / "model", gemma_like, eos=0, bos=100), corpus,
        tmp_path / "tokens", "--val_fraction=0.2")
    train, meta = prepare.open_tokens(tmp_path / "tokens", "train")
    val, _ = prepare.open_tokens(tmp_path / "tokens", "val")
    assert meta["bos_token_id"] == 100
    assert 100 not in train.tolist() + val.tolist()
    assert train[:6].tolist() == [1, 2, 0, 2, 3, 0]


def test_rerun_is_a_no_op_and_changed_settings_rebuild(tmp_path, tokenizer, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    model_dir = make_model_dir(tmp_path / "model", tokenizer)
    tokens = tmp_path / "tokens"
    run(model_dir, corpus, tokens, "--val_fraction=0.25")
    outputs = [tokens / n for n in ("train.bin", "val.bin", "meta.json")]
    before = [os.stat(p).st_mtime_ns for p in outputs]
    capsys.readouterr()

    run(model_dir, corpus, tokens, "--val_fraction=0.25")
    out = capsys.readouterr().out
    assert "model: " in out and "nothing to do" in out.split("tokens:")[0]
    assert "matches the settings; nothing to do" in out
    assert [os.stat(p).st_mtime_ns for p in outputs] == before

    run(model_dir, corpus, tokens, "--val_fraction=0.25", "--max_tokens=100")
    assert "settings changed since the last run (max_tokens)" in capsys.readouterr().out
    assert prepare.open_tokens(tokens, "train")[1]["train_tokens"] == 100


def test_interrupted_run_keeps_the_previous_tokens_and_rerun_succeeds(tmp_path, tokenizer,
                                                                       monkeypatch, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    model_dir = make_model_dir(tmp_path / "model", tokenizer)
    tokens = tmp_path / "tokens"
    run(model_dir, corpus, tokens, "--val_fraction=0.25", "--max_tokens=100")  # an older result

    def killed_midway(dataset, data_files, text_field):
        yield from DOCS[:6]
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prepare, "read_documents", killed_midway)
        patch.setattr(prepare, "_BATCH_CHARS", 1)  # encode and write one document at a time
        patch.setattr(prepare, "_PROGRESS_SECONDS", 0.0)  # a progress line after each document
        with pytest.raises(KeyboardInterrupt):
            run(model_dir, corpus, tokens, "--val_fraction=0.25")
    out = capsys.readouterr().out
    assert "tok/s" in out and "ETA" in out
    assert os.path.getsize(tokens / "train.bin.tmp") > 0  # it was killed while writing ...
    assert prepare.open_tokens(tokens)[1]["train_tokens"] == 100  # ... beside the older result

    run(model_dir, corpus, tokens, "--val_fraction=0.25")
    run(model_dir, corpus, tmp_path / "fresh", "--val_fraction=0.25")
    for name in ("train.bin", "val.bin"):
        assert (tokens / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert_partition(tokenizer, DOCS, tokens)


def test_a_failed_rebuild_leaves_the_previous_tokens_complete(tmp_path, tokenizer, monkeypatch, capsys):
    """A mistyped --dataset or an empty corpus fails with one error, and the token files made
    before (for a real run, hours of tokenizing) are still there and usable."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    model_dir = make_model_dir(tmp_path / "model", tokenizer)
    tokens = tmp_path / "tokens"
    run(model_dir, corpus, tokens, "--val_fraction=0.25")
    before = {name: (tokens / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}

    def no_such_repo(repo, **kwargs):  # what the hub answers for a name that is no repo
        raise hub_error(huggingface_hub.errors.RepositoryNotFoundError, 404, f"https://hf.co/api/datasets/{repo}")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_such_repo)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    for dataset, error, message in [(tmp_path / "docs.jsnol", FileNotFoundError, "no such file or folder"),
                                    (tmp_path / "empty", ValueError, "got no document")]:
        with pytest.raises(error, match=message):
            run(model_dir, dataset, tokens, "--val_fraction=0.25")
        assert {name: (tokens / name).read_bytes() for name in before} == before
        assert_partition(tokenizer, DOCS, tokens)  # complete and usable
    capsys.readouterr()
    run(model_dir, corpus, tokens, "--val_fraction=0.25")  # the old settings again: still complete
    assert "matches the settings; nothing to do" in capsys.readouterr().out


def test_open_tokens_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="run prepare.py"):
        prepare.open_tokens(tmp_path / "nowhere")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    tokens = tmp_path / "tokens"
    run(make_model_dir(tmp_path / "model", tokenizer), corpus, tokens, "--val_fraction=0.25")
    with pytest.raises(ValueError, match="split must be"):
        prepare.open_tokens(tokens, "test")

    with open(tokens / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="val.bin has .* bytes but meta.json says"):
        prepare.open_tokens(tokens, "val")
    prepare.open_tokens(tokens, "train")  # the other split is still fine

    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "dtype": "int64"}))
    with pytest.raises(ValueError, match="unknown dtype 'int64'"):
        prepare.open_tokens(tokens, "train")


def test_bad_corpus_gives_one_clear_error(tmp_path, tokenizer, monkeypatch):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: no text field 'text' .*content"):
        list(prepare.read_file_documents(str(jsonl), "text"))

    for suffix, module, package in [(".jsonl.zst", "zstandard", "zstandard"),
                                    (".parquet", "pyarrow.parquet", "pyarrow")]:
        path = tmp_path / f"docs{suffix}"
        path.write_bytes(b"")
        monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
        with pytest.raises(ImportError, match=f"pip install {package}"):
            list(prepare.read_file_documents(str(path), "text"))

    model_dir = make_model_dir(tmp_path / "model", tokenizer)
    (tmp_path / "one.txt").write_text("a single document cannot fill train and val")
    with pytest.raises(ValueError, match="got no document"):
        run(model_dir, tmp_path / "one.txt", tmp_path / "tokens")
    with pytest.raises(FileNotFoundError, match="holds no"):
        run(model_dir, tmp_path / "model", tmp_path / "tokens")


def test_load_tokenizer_and_single_token_id(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        prepare.load_tokenizer(tmp_path)
    loaded = prepare.load_tokenizer(make_model_dir(tmp_path, tokenizer))
    assert prepare.single_token_id(loaded, "<|endoftext|>") == 0
    assert prepare.single_token_id(loaded, "<|padding|>") == 1
    (the,) = encode(loaded, " the")  # ordinary text that is one token
    assert prepare.single_token_id(loaded, " the") == the
    with pytest.raises(ValueError, match=r"'<mask>' is not a single token: .* maps it to \d+ ids"):
        prepare.single_token_id(loaded, "<mask>")
    with pytest.raises(ValueError, match="maps it to 0 ids"):
        prepare.single_token_id(loaded, "")


def test_tiny_default_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import GPTNeoXForCausalLM
    monkeypatch.setattr(prepare, "_TINY_TOKENIZER_CHARS", 300_000)  # seconds, not tens
    model_dir, tokens = tmp_path / "model", tmp_path / "tokens"
    prepare.main([TINY_CONFIG, f"--model_dir={model_dir}", f"--tokens_dir={tokens}", "--max_tokens=20000",
                  "--val_fraction=0.1", "--eval_sets=[]"])  # tests/test_evaldata.py builds them
    assert "RANDOM" in capsys.readouterr().out

    assert sorted(os.listdir(model_dir)) == ["config.json", "model.safetensors", "prepared_from.json", "tokenizer.json"]
    umask = os.umask(0)
    os.umask(umask)
    for path in [*model_dir.iterdir(), *tokens.iterdir()]:  # readable like any new file, not owner-only
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["model_type"] == "gpt_neox"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], config["vocab_size"]) == (128, 4, 4, 512, 4096)
    assert config["rotary_pct"] == 0.25 and config["use_parallel_residual"] is True
    assert config["tie_word_embeddings"] is False
    tokenizer = prepare.load_tokenizer(model_dir)
    assert tokenizer.get_vocab_size() == 4096
    assert (tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|padding|>")) == (0, 1)
    text = "def f(x):\n    return x  # café ✓\n"
    assert tokenizer.decode(encode(tokenizer, text)) == text  # byte-level: lossless

    # transformers reads our folder as a GPT-NeoX checkpoint: every parameter comes from our file.
    ours = load_file(model_dir / "model.safetensors")
    hf = GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
    # transformers >= 5 keeps the hub's embed_out under the name lm_head in memory.
    theirs = {"embed_out.weight" if name == "lm_head.weight" else name: p
              for name, p in hf.named_parameters()}
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name].detach(), tensor), name

    train, meta = prepare.open_tokens(tokens, "train")
    assert meta["train_tokens"] == 20000 and meta["val_tokens"] > 0 and meta["dtype"] == "uint16"
    assert meta["source"].startswith("stdlib") and meta["eos_token_id"] == meta["bos_token_id"] == 0
    idx = torch.tensor(np.array(train[:64], dtype=np.int64))[None]
    with torch.no_grad():
        logits = hf(idx).logits
    assert logits.shape == (1, 64, 4096) and torch.isfinite(logits).all()
    import model  # and so does the project's own loader, which every later stage uses
    with torch.no_grad():
        torch.testing.assert_close(model.load(str(model_dir))(idx), logits, rtol=1e-4, atol=1e-4)


def test_tiny_model_is_deterministic():
    a, b, c = prepare.tiny_state_dict(0), prepare.tiny_state_dict(0), prepare.tiny_state_dict(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed_out.weight"], c["embed_out.weight"])
    texts = DOCS * 5
    assert (prepare.train_tiny_tokenizer(texts).to_str()
            == prepare.train_tiny_tokenizer(texts).to_str())


def test_bin_to_safetensors_round_trip(tmp_path):
    weight = torch.randn(6, 4)
    state = {"embed_in.weight": weight, "embed_out.weight": weight,  # tied: shared memory
             "row": weight[2], "transposed": torch.randn(4, 3).t(),  # a view and a strided one
             "half": torch.randn(5).half(), "mask": torch.ones(3, 3, dtype=torch.bool).tril()}
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(state, bin_path)
    prepare.convert_bin_to_safetensors(str(bin_path))
    assert not bin_path.exists()
    converted = load_file(tmp_path / "model.safetensors")
    assert set(converted) == set(state)
    for name, tensor in state.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name


class _RunsCode:
    """A pickle that would run a command when loaded without weights_only."""
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_bin_file_holding_code_is_refused_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save({"embed_in.weight": torch.zeros(2), "payload": _RunsCode()}, bin_path)
    with pytest.raises(ValueError, match="refusing to load .*holds more than tensors") as refused:
        prepare.convert_bin_to_safetensors(str(bin_path))
    assert "GLOBAL posix.system" in str(refused.value) and "weights_only" not in str(refused.value)  # no advice to run it
    assert not (tmp_path / "pwned").exists() and bin_path.exists()
    assert not (tmp_path / "model.safetensors").exists()


def test_no_script_unpickles_except_the_bin_conversion():
    """torch.load appears once, with weights_only=True; pickle is never called directly."""
    calls = []
    for path in sorted(REPO.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", "")
                if (owner, node.func.attr) in {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}:
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    calls.append((path.name, f"{owner}.{node.func.attr}", safe))
    assert calls == [("prepare.py", "torch.load", True)]


def fake_hub_model(files, tokenizer, calls):
    """Stand-ins for list_repo_files and snapshot_download over a repo holding `files`."""
    def list_repo_files(repo, revision=None, repo_type=None, token=None):
        calls.append(("list", repo, revision))
        return files

    def snapshot_download(repo, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        calls.append(("download", repo, revision, allow_patterns))
        tokenizer.save(os.path.join(local_dir, "tokenizer.json"))
        with open(os.path.join(local_dir, "config.json"), "w") as f:
            json.dump({"eos_token_id": 0, "bos_token_id": 0}, f)
        weights = {"embed_in.weight": torch.arange(6.0).reshape(2, 3)}
        if "model.safetensors" in files:
            save_file(weights, os.path.join(local_dir, "model.safetensors"))
        else:
            torch.save(weights, os.path.join(local_dir, "pytorch_model.bin"))
        return local_dir
    return list_repo_files, snapshot_download


def hub_cfg(tmp_path, repo):
    return SimpleNamespace(model=repo, model_dir=str(tmp_path / "model"), revision="step1000",
                           seed=0)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hub_download_and_offline_rerun(tmp_path, tokenizer, monkeypatch, capsys, weights):
    calls = []
    files = ["config.json", weights, "tokenizer.json", "README.md", "flax_model.msgpack"]
    list_files, download = fake_hub_model(files, tokenizer, calls)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    cfg = hub_cfg(tmp_path, "EleutherAI/pythia-14m")
    prepare.prepare_model(cfg)

    (_, repo, revision), (_, _, _, patterns) = calls
    assert repo == "EleutherAI/pythia-14m" and revision == "step1000"
    assert {"config.json", "*.safetensors", "tokenizer.json"} <= set(patterns)
    assert ("pytorch_model.bin" in patterns) == (weights == "pytorch_model.bin")
    assert "pytorch_model.bin" not in os.listdir(cfg.model_dir)
    state = load_file(os.path.join(cfg.model_dir, "model.safetensors"))
    assert torch.equal(state["embed_in.weight"], torch.arange(6.0).reshape(2, 3))

    def offline(*args, **kwargs):
        raise AssertionError("a complete model folder must not touch the network")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    capsys.readouterr()
    prepare.prepare_model(cfg)
    assert "nothing to do" in capsys.readouterr().out


def test_hub_repo_without_tokenizer_json(tmp_path, tokenizer, monkeypatch):
    calls = []
    list_files, download = fake_hub_model(["config.json", "model.safetensors"], tokenizer, calls)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        prepare.prepare_model(hub_cfg(tmp_path, "someone/slow-tokenizer-only"))
    assert [c[0] for c in calls] == ["list"]


def hub_error(cls, status, url):
    response_class = huggingface_hub.errors.Response  # the HTTP library this hub version uses
    request = importlib.import_module(response_class.__module__).Request("GET", url)
    return cls(f"{status} Client Error", response=response_class(status, request=request))


@pytest.mark.parametrize("cls, status", [("GatedRepoError", 403), ("HfHubHTTPError", 401)])
def test_gated_repo_says_accept_license_and_set_hf_token(tmp_path, monkeypatch, cls, status):
    def refuse(repo, **kwargs):
        raise hub_error(getattr(huggingface_hub.errors, cls), status, f"https://hf.co/api/{repo}")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", refuse)
    with pytest.raises(PermissionError) as error:
        prepare.prepare_model(hub_cfg(tmp_path, "google/gemma-2-2b"))
    message = str(error.value)
    assert "accept the license on https://huggingface.co/google/gemma-2-2b" in message
    assert "HF_TOKEN" in message


def test_hub_dataset_files_in_order_and_lazily(tmp_path, tokenizer, monkeypatch):
    shards = {"train/00.jsonl": DOCS[:6], "train/01.jsonl": DOCS[6:], "val.jsonl": ["other"]}
    for name, texts in shards.items():
        path = tmp_path / "hub" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    downloaded = []

    def list_repo_files(repo, repo_type=None, **kwargs):
        assert repo_type == "dataset"
        return ["README.md", "train/01.jsonl", "val.jsonl", "train/00.jsonl", "train/notes.md"]

    def hf_hub_download(repo, name, repo_type=None, **kwargs):
        assert (repo, repo_type) == ("monology/pile-uncopyrighted", "dataset")
        downloaded.append(name)
        return str(tmp_path / "hub" / name)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    model_dir = make_model_dir(tmp_path / "model", tokenizer)

    run(model_dir, "monology/pile-uncopyrighted", tmp_path / "tokens", "--data_files=train/*",
        "--val_fraction=0.25")
    assert downloaded == ["train/00.jsonl", "train/01.jsonl"]
    assert_partition(tokenizer, DOCS, tmp_path / "tokens")

    downloaded.clear()  # a cap reached inside the first file never fetches the second
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 1)  # (a batch may span a file boundary)
    run(model_dir, "monology/pile-uncopyrighted", tmp_path / "capped", "--data_files=train/*",
        "--val_fraction=0.25", "--max_tokens=70")
    assert downloaded == ["train/00.jsonl"]
