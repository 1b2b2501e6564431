"""Where the data comes from, by example: prepare.py builds every evaluation set (the offline
stdlib sets, the sae-probes wheel's sets, SAEBench's hub sets) and reads the wheel's English prose
for training; evaluate.py only reads the sets and, when one is missing, says in one line which
prepare.py command makes it. The wheel is a small fake folder the tests write, except in the tests
marked as reading the installed package; the hub is never contacted."""
import csv
import importlib.util
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import configurator
import evaluate
import prepare
from conftest import TINY_CONFIG

zstandard = pytest.importorskip("zstandard")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
installed = pytest.mark.skipif(importlib.util.find_spec("sae_probes") is None, reason=(
    "reads the installed sae-probes wheel: pip install --no-deps sae-probes==0.4.2 zstandard"))


def write_csv_zst(path, rows):
    """rows of (prompt, target), as the wheel stores them."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["prompt", "prompt_len", "target"])
    writer.writerows((prompt, len(prompt.split()), target) for prompt, target in rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(text.getvalue().encode()))


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A fake sae-probes data folder holding every file prepare.py reads, and the names it read."""
    data = tmp_path / "sae_probes" / "data"
    train = {}
    for name in prepare.SAE_PROBES_TRAIN:
        train[name] = [(f"A line of {name}, number {i}.", str(i % 2)) for i in range(3)]
        train[name].append(("A text that two datasets share.", "0"))
    train["111_yelp_data"].append(("Great food.\\nWould go again.", "4"))  # a literal backslash-n
    train["56_wikidatasex_or_gender"].append(("5_hist_fig_ismale in 0", "male"))  # an OOD task's text
    for name, rows in train.items():
        write_csv_zst(data / "cleaned_data" / f"{name}.csv.zst", rows)
    news = [(f"{topic} story {i}, with \"quotes\", commas\nand a line break.", topic)
            for topic in ("Politics", "Sport", "Technology", "Entertainment") for i in range(10)]
    news += [("Politics story 0, with \"quotes\", commas\nand a line break.", "Politics"),  # again
             ("A story filed under two topics.", "Sport"), ("A story filed under two topics.", "Politics")]
    write_csv_zst(data / "cleaned_data" / "97_news_class.csv.zst", news)
    binary = {"107_hate_offensive": ("1", "0"), "110_aimade_humangpt3": ("0", "1"),
              "105_click_bait": ("clickbait", "factual")}
    for name, labels in binary.items():
        write_csv_zst(data / "cleaned_data" / f"{name}.csv.zst",
                      [(f"{name} text {i} of {label}", label) for label in labels for i in range(6)])
    ethics = [(f"I took my neighbour's {thing} without asking.", "1") for thing in ("car", "dog", "lamp")]
    ethics += [(f"I returned my neighbour's {thing}.", "0") for thing in ("car", "dog", "lamp")]
    ethics += [(f"AITA for skipping {event}? | Long story, version {label}.", label)
               for event in ("a wedding", "a party", "a funeral") for label in ("0", "1")]
    write_csv_zst(data / "cleaned_data" / "48_cm_correct.csv.zst", ethics)
    for task in prepare.SAE_PROBES_OOD:
        write_csv_zst(data / "cleaned_data" / f"{task}.csv.zst", [(f"{task} in {i}", str(i % 2)) for i in range(6)])
        write_csv_zst(data / "OOD data" / f"{task}_OOD.csv.zst", [(f"{task} out {i}", str(i % 2)) for i in range(4)])
    monkeypatch.setattr(prepare, "sae_probes_data", lambda: str(data))
    read, rows_of = [], prepare.sae_probes_rows
    monkeypatch.setattr(prepare, "sae_probes_rows", lambda name, folder="cleaned_data": (
        read.append(name), rows_of(name, folder))[1])
    return SimpleNamespace(data=data, train=train, news=news, ethics=ethics, read=read)


# ----------------------------------------------------------------------------- training text

def test_the_corpus_is_each_distinct_training_text_once_in_a_seeded_mix(wheel):
    documents = list(prepare.read_documents("sae-probes", "", "text"))
    expected = {text.replace("\\n", "\n") for rows in wheel.train.values() for text, _ in rows}
    expected.remove("5_hist_fig_ismale in 0")  # an evaluation file holds it: left out
    assert len(documents) == len(set(documents)) and set(documents) == expected
    assert "Great food.\nWould go again." in documents     # Yelp's spelled-out line break, restored
    assert documents == list(prepare.read_documents("sae-probes", "", "text"))  # a fixed order
    first = {d.split(",")[0] for d in documents[:20]}
    assert len(first) >= 10  # a capped max_tokens takes a mix of datasets, not the first few


def test_prepare_tokenizes_the_sae_probes_corpus(wheel, tmp_path):
    documents = prepare.sae_probes_documents()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    prepare.train_tiny_tokenizer(documents).save(str(model_dir / "tokenizer.json"))
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    save_file({"w": torch.zeros(1)}, str(model_dir / "model.safetensors"))
    prepare.main([TINY_CONFIG, f"--model={model_dir}", f"--model_dir={model_dir}", "--dataset=sae-probes",
                  f"--tokens_dir={tmp_path}/tokens", "--val_fraction=0.2", "--eval_sets=[]"])
    meta = prepare.open_tokens(tmp_path / "tokens")[1]
    assert meta["source"] == "sae-probes" and sum(meta["documents"].values()) == len(documents)


def test_a_missing_wheel_or_file_is_one_line_that_says_what_to_install(wheel, monkeypatch):
    os.remove(wheel.data / "cleaned_data" / "113_movie_sent.csv.zst")
    with pytest.raises(FileNotFoundError, match=r"113_movie_sent\.csv\.zst not found.*sae-probes==0\.4\.2"):
        prepare.sae_probes_documents()
    monkeypatch.undo()  # the real lookup, with the package made invisible
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError) as error:
        list(prepare.read_documents("sae-probes", "", "text"))
    assert str(error.value) == ("the sae-probes package is not installed: pip install --no-deps "
                                "sae-probes==0.4.2 zstandard")


# ----------------------------------------------------------------------------- evaluation sets

def test_training_and_evaluation_use_different_datasets_of_the_wheel():
    assert set(prepare.SAE_PROBES_TRAIN).isdisjoint(prepare.SAE_PROBES_EVAL)
    assert set(prepare.SAE_PROBES_OOD) <= set(prepare.SAE_PROBES_EVAL)


def test_the_sae_probes_sets(wheel, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "_PROBING_TEST_PER_CLASS", 3)  # of the fake wheel's 10 news, 6 binary texts a class
    cfg = SimpleNamespace(eval_data_dir=str(tmp_path / "eval"),
                          eval_sets=["sae_probes_probing", "sae_probes_ethics", "sae_probes_ood"])
    prepare.prepare_eval_sets(cfg)
    assert set(wheel.read) <= set(prepare.SAE_PROBES_EVAL) | {f"{t}_OOD" for t in prepare.SAE_PROBES_OOD}

    def rows(relative):
        return prepare.read_eval_rows(cfg.eval_data_dir, relative)

    # news: the topics named by what the texts are about; distinct texts, none in both splits, a
    # text filed under two topics dropped; 3 test texts a topic, the rest train
    train, test = rows("sae_probes_probing/ag_news/train.jsonl"), rows("sae_probes_probing/ag_news/test.jsonl")
    assert {r["label"] for r in train + test} == {"world", "sports", "business", "scitech"}
    topics = {"Politics": "world", "Sport": "sports", "Technology": "business", "Entertainment": "scitech"}
    assert all(r["label"] == topics[r["text"].split()[0]] for r in train + test)
    texts = [r["text"] for r in train + test]
    assert len(texts) == len(set(texts)) == 40 and sorted(r["label"] for r in test) == sorted(list(topics.values()) * 3)
    assert "A story filed under two topics." not in texts
    assert any("\n" in t and '"quotes"' in t for t in texts)  # quoted CSV fields survive
    # the binary tasks: their labels renamed, 3 test texts a class and 3 to train on
    for folder, named in (("offensive", {"1": "offensive", "0": "other"}), ("ai_text", {"0": "human", "1": "gpt3"}),
                          ("clickbait", {"clickbait": "clickbait", "factual": "factual"})):
        train, test = rows(f"sae_probes_probing/{folder}/train.jsonl"), rows(f"sae_probes_probing/{folder}/test.jsonl")
        for part in (train, test):
            assert sorted(r["label"] for r in part) == sorted(list(named.values()) * 3)
            assert all(r["label"] == named[r["text"].split()[-1]] for r in part)
    meta = json.loads((tmp_path / "eval" / "sae_probes_probing" / "meta.json").read_text())
    assert meta["rows"]["ag_news/test.jsonl"] == 12 and meta["rows"]["clickbait/train.jsonl"] == 6
    # ethics: the class from the wheel's label, the attribute from the text's origin
    ethics = rows("sae_probes_ethics/train.jsonl") + rows("sae_probes_ethics/test.jsonl")
    assert len(ethics) == len(wheel.ethics)
    for r in ethics:
        assert r["attr"] == ("reddit" if r["text"].startswith("AITA") else "short")
        assert r["label"] == dict(wheel.ethics)[r["text"]].replace("1", "wrong").replace("0", "not_wrong")
    # OOD: the pairs as the wheel has them
    for task in prepare.SAE_PROBES_OOD:
        assert rows(f"sae_probes_ood/id/{task}.jsonl") == prepare.read_rows(
            str(wheel.data / "cleaned_data" / f"{task}.csv.zst"))
        assert rows(f"sae_probes_ood/ood/{task}.jsonl") == prepare.read_rows(
            str(wheel.data / "OOD data" / f"{task}_OOD.csv.zst"))
    # complete sets are not rebuilt
    capsys.readouterr()
    prepare.prepare_eval_sets(cfg)
    assert capsys.readouterr().out.count("is complete; nothing to do") == 3


def test_a_probing_class_without_texts_left_to_train_on_is_refused(wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_PROBING_TEST_PER_CLASS", 6)  # every fake binary class has 6 texts
    with pytest.raises(ValueError, match=r"^offensive: labels \['offensive', 'other'\] have no more than 6 distinct"):
        prepare.build_sae_probes_probing(str(tmp_path), "sae_probes_probing")


def test_the_stdlib_sets(tmp_path):
    prepare.prepare_eval_sets(SimpleNamespace(eval_data_dir=str(tmp_path), eval_sets=["stdlib_docs"]))
    assert (tmp_path / "stdlib_kind" / "meta.json").exists()  # built together with stdlib_docs
    docs = prepare.read_rows(str(tmp_path / "stdlib_docs" / "train.jsonl"))
    assert {r["label"] for r in docs} == set(prepare._STDLIB_PACKAGES)
    for r in docs:  # the spurious attribute: a docstring rewritten as comments, or not
        commented = all(line.startswith("# ") for line in r["text"].splitlines())
        assert r["attr"] == ("comment" if commented else "plain"), r["text"][:80]
    read = {name: prepare.read_rows(str(tmp_path / "stdlib_kind" / f"{name}.jsonl"))
            for name in ("id", "ood_upper", "ood_reversed")}
    assert {r["label"] for r in read["id"]} == {"class", "function"}
    for upper, reversed_ in zip(read["ood_upper"], read["ood_reversed"]):
        assert upper["label"] == reversed_["label"]
        assert upper["text"].split() == [w.upper() for w in reversed(reversed_["text"].split())]
    assert not {r["text"] for r in read["id"]} & {" ".join(reversed(r["text"].split())) for r in read["ood_reversed"]}


def test_a_hub_dataset_becomes_capped_train_and_test_files(tmp_path, monkeypatch):
    fetched = []

    def parquet_rows(repo, contains, columns, max_files=None):
        fetched.append((repo, contains))
        return [{"hard_text": f"{contains} bio {i}", "profession": i % 2, "gender": 0} for i in range(7)]

    monkeypatch.setattr(prepare, "_hub_parquet_rows", parquet_rows)
    monkeypatch.setattr(prepare, "_HUB_CELL_CAP", 3)
    prepare.prepare_eval_sets(SimpleNamespace(eval_data_dir=str(tmp_path), eval_sets=["bias_in_bios"]))
    assert fetched == [("LabHC/bias_in_bios", "train"), ("LabHC/bias_in_bios", "test")]
    test = prepare.read_rows(str(tmp_path / "bias_in_bios" / "test.jsonl"))
    assert test == [{"text": f"test bio {i}", "label": ("accountant", "architect")[i % 2], "attr": "male"}
                    for i in range(6)]  # 3 per (profession, gender) cell, in dataset order


def test_an_unknown_set_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown eval_sets \['bias_in_bio'\]: prepare.py builds stdlib_docs"):
        prepare.main(["--eval_sets=['bias_in_bio']", f"--model_dir={tmp_path}/model"])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("configs", [[], ["pythia160m.py", "saebench.py"], ["tiny.py"]],
                         ids=["defaults", "saebench", "tiny"])
def test_prepare_builds_every_set_that_evaluate_reads(configs):
    paths = [str(CONFIGS / name) for name in configs]
    reads, builds = configurator.configure(vars(evaluate), paths), configurator.configure(vars(prepare), paths)
    needed = ({task[1].split("/")[0] for task in reads.probing_tasks + reads.tpp_tasks} | {run[0] for run in reads.scr_runs}
              | {file.split("/")[0] for _, *files in reads.ood_tasks for file in files}
              | ({reads.core_dataset} - {"val"}))
    assert needed <= set(builds.eval_sets) and builds.eval_data_dir == reads.eval_data_dir


# ----------------------------------------------------------------------------- evaluate.py reads

def test_evaluate_says_which_prepare_command_makes_a_missing_set(tmp_path):
    cfg = configurator.configure(vars(evaluate), [TINY_CONFIG, f"--eval_data_dir={tmp_path}"])
    for run, name in ((evaluate.run_sparse_probing, "stdlib_docs"), (evaluate.run_scr, "stdlib_docs"),
                      (evaluate.run_ood, "stdlib_kind")):
        with pytest.raises(FileNotFoundError) as error:
            run(SimpleNamespace(max_positions=128), [], cfg)
        assert str(error.value) == (
            f"{tmp_path}/{name}/{'id' if name == 'stdlib_kind' else 'train'}.jsonl not found: make it "
            f"with python prepare.py [your config.py] --eval_sets=\"['{name}']\" --eval_data_dir={tmp_path}")
    cfg.probing_tasks = [("mine", "my_data", ["a", "b"])]
    with pytest.raises(FileNotFoundError, match=r"prepare.py builds no set 'my_data' \(it builds stdlib_docs"):
        evaluate.run_sparse_probing(None, [], cfg)


# ----------------------------------------------------------------------------- the installed wheel

@installed
def test_installed_wheel_no_text_is_both_trained_on_and_probed():
    trained = set(prepare.sae_probes_documents())
    assert sum(map(len, trained)) > 20_000_000  # ~5M tokens at Gemma 3's ~4.5 characters a token
    probed = {r["text"] for name in prepare.SAE_PROBES_EVAL for r in prepare.sae_probes_rows(name)}
    probed |= {r["text"] for name in prepare.SAE_PROBES_OOD for r in prepare.sae_probes_rows(f"{name}_OOD", "OOD data")}
    assert not probed & trained


@installed
def test_installed_wheel_holds_the_default_evaluation_sizes(tmp_path):
    """500 test texts a class for every probing task (and some to train on); SAE-Probes' OOD sizes:
    1,500 ID rows in the pool and 512 of each class among them."""
    prepare.build_sae_probes_probing(str(tmp_path), "sae_probes_probing")
    for task, folder, classes in evaluate.probing_tasks:
        for split in ("train", "test"):
            labels = [r["label"] for r in prepare.read_eval_rows(str(tmp_path), f"{folder}/{split}.jsonl")]
            counts = [labels.count(c) for c in classes]
            assert (counts == [evaluate.probing_test_per_class] * len(classes)) if split == "test" else min(counts) > 250, task
    for task in prepare.SAE_PROBES_OOD:
        pool = [r["label"] for r in prepare.sae_probes_rows(task)][:evaluate.ood_pool_rows]
        assert len(pool) == evaluate.ood_pool_rows and min(map(pool.count, set(pool))) >= evaluate.ood_train_per_class


@installed
def test_installed_wheel_ethics_origin_is_what_49_cm_isshort_labels():
    rows = prepare.sae_probes_rows("49_cm_isshort")
    assert len(rows) == 5000
    assert all((" | " in r["text"]) == (r["label"] == "False") for r in rows)
