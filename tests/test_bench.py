"""bench.py runs end to end in quick mode (tiny shapes, no compile) and writes its table as JSON.
Timings are not asserted: this machine is shared, and bench.py is where numbers come from."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_row(tmp_path):
    json_path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick=True", f"--cache_dir={tmp_path / 'models'}",
                             f"--json_path={json_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harvest pythia-tiny" in result.stdout and "sae step" in result.stdout  # the printed table
    table = json.loads(json_path.read_text())
    assert table["settings"]["quick"] is True and table["threads"] == 2
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
    assert step["ours_tok_s"] > 0 and step["limit_tok_s"] > 0
    assert abs(step["pct_of_limit"] - 100 * step["ours_tok_s"] / step["limit_tok_s"]) < 1e-9


def test_only_runs_the_rows_whose_name_contains_it(tmp_path):
    json_path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick=True", "--only=gemma3",
                             f"--cache_dir={tmp_path / 'models'}", f"--json_path={json_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {row["row"] for row in json.loads(json_path.read_text())["rows"]} == {
        "harvest gemma3-tiny L6 ctx32", "bf16 gemma3-tiny L6 ctx32"}
