"""bench.py runs end to end in quick mode (tiny shapes, no compile) and writes its table as JSON.
Timings are not asserted: this machine is shared, and bench.py is where numbers come from. The runs
here take one thread: pytest-xdist gives each worker one core, and bench.py's default of 2 threads
fights the other worker for it (--only=gemma3 took 37 s with 2 threads, 12 s with 1, at load 5.6)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_row(tmp_path):
    json_path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick=True", "--threads=1",
                             f"--cache_dir={tmp_path / 'models'}", f"--json_path={json_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harvest pythia-tiny" in result.stdout and "sae step" in result.stdout  # the printed table
    table = json.loads(json_path.read_text())
    assert table["settings"]["quick"] is True and table["threads"] == 1
    rows = {row["row"]: row for row in table["rows"]}
    harvest = [row for row in table["rows"] if row["row"].startswith("harvest")]
    assert {row["vs"].split(" (")[0] for row in harvest if "pythia" in row["row"]} == {
        "transformers full forward + output_hidden_states", "transformers stopped after block 1"}  # hooked at L1
    assert any("gemma2-tiny" in row["row"] for row in harvest)
    assert {row["vs"] for row in harvest if "gemma3-tiny L6" in row["row"]} == {
        "transformers full forward + output_hidden_states", "transformers stopped after block 6"}
    bf16 = rows["bf16 gemma3-tiny L6 ctx32"]  # our forward in bf16 vs fp32
    assert bf16["vs"] == "ours in fp32" and bf16["ratio"] == bf16["ours_tok_s"] / bf16["vs_tok_s"]
    for row in harvest:
        assert row["ours_tok_s"] > 0 and row["ratio"] == row["ours_tok_s"] / row["vs_tok_s"]
    step = rows["sae step d64 F512 k8 B256 eager"]
    assert step["ours_tok_s"] > 0 and step["limit_tok_s"] > 0 and step["gemm_dtype"] == "fp32"
    assert abs(step["pct_of_limit"] - 100 * step["ours_tok_s"] / step["limit_tok_s"]) < 1e-9
    step16 = rows["sae step d64 F512 k8 B256 bf16 autocast"]  # on a CPU the sparse step stays fp32
    assert step16["vs"] == "ours eager fp32" and step16["gemm_dtype"] == "fp32"
    cache = rows["cache gemma3-tiny L6 ctx32 F512 k8"]  # one SAE from the cache vs harvest + train
    dtype = model_lib.resolve_dtype("auto", "gemma3", "cpu")  # gemma3_dtype=auto: bf16 where the CPU has bf16 units
    assert cache["vs"].startswith(f"harvest ({dtype}) + train")
    assert cache["cache_bytes_per_token"] == 64 * (2 if dtype == "bfloat16" else 4) + 1
    for row in table["rows"]:  # every side's spread over the repeats, "noisy" exactly where they overlap
        low, median, high = row["ours_spread"]
        assert low <= median == row["ours_tok_s"] <= high
        if "vs" in row and "vs_spread" in row:
            (a, _, b), (c, _, d) = row["ours_spread"], row["vs_spread"]
            assert row["noisy"] == (a <= d and c <= b)


def test_only_runs_the_rows_whose_name_contains_it(tmp_path):
    json_path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick=True", "--threads=1", "--only=gemma3",
                             f"--cache_dir={tmp_path / 'models'}", f"--json_path={json_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {row["row"] for row in json.loads(json_path.read_text())["rows"]} == {
        "harvest gemma3-tiny L6 ctx32", "bf16 gemma3-tiny L6 ctx32", "cache gemma3-tiny L6 ctx32 F512 k8"}


# ----------------------------------------------------------------------------- the GPU report
# It needs a CUDA GPU, so only what runs without one is tested here: the refusal, the random
# Pythia-shaped folder train.py is given, and the figures read from a train.py log.

def test_gpu_report_is_refused_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import bench
    with pytest.raises(SystemExit, match=r"--gpu_report needs a CUDA GPU .*device=cpu"):
        bench.main([f"--gpu_report={tmp_path}/gpu.json"])  # the default device
    result = subprocess.run([sys.executable, "bench.py", "--device=cuda", f"--gpu_report={tmp_path}/gpu.json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [  # one line, no traceback
        "bench.py: --gpu_report needs a CUDA GPU and --device=cuda (here device=cuda, "
        "torch.cuda.is_available()=False); nothing was run"]
    assert not (tmp_path / "gpu.json").exists()


def test_random_pythia_folder_loads_at_the_given_shape(tmp_path):
    import bench
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    hub = dict(bench._PYTHIA, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64)
    bench.random_pythia(str(tmp_path / "m"), hub, str(tmp_path / "tok"), seed=0)
    m = model_lib.load(str(tmp_path / "m"))
    assert (m.cfg.d_model, m.cfg.n_layer, m.cfg.vocab_size) == (32, 2, 64)
    out = m.resid_post(torch.randint(2, 64, (2, 8)), 1)
    assert out.shape == (2, 8, 32) and torch.isfinite(out).all()
    assert (tmp_path / "m" / "tokenizer.json").read_text() == "{}"


def test_training_figures_come_from_the_wall_time_and_the_log(tmp_path):
    import bench
    log = ("buffer filled in 2.5s\n"
           "step 50/300 | k20 loss 0.1 | harvest 900.0k tok/s, sae 1500.5k tok/s | eta 0.1 min\n"
           "step 300/300 | k20 loss 0.1 | harvest 1200.0k tok/s, sae 1800.0k tok/s | eta 0.0 min\n")
    figures = bench.training_figures(log, wall_s=60.0, steps=300, batch_size=2048)
    assert figures == dict(steps=300, tokens=614400, wall_s=60.0, tok_s_end_to_end=10240.0,
                           harvest_tok_s_last_log=1.2e6, sae_tok_s_last_log=1.8e6, buffer_fill_s=2.5)
    assert bench.training_figures("", 1.0, 1, 1)["sae_tok_s_last_log"] is None  # a log without rates
    bench.prepare.write_json(str(tmp_path / "r" / "gpu.json"), dict(training=figures))  # as main() does
    assert json.loads((tmp_path / "r" / "gpu.json").read_text())["training"] == figures
    assert os.listdir(tmp_path / "r") == ["gpu.json"]  # no .tmp left
