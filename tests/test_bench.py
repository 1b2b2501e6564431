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
    for row in harvest:
        assert row["ours_tok_s"] > 0 and row["ratio"] == row["ours_tok_s"] / row["vs_tok_s"]
    step = rows["sae step d64 F512 k8 B256 eager"]
    assert step["ours_tok_s"] > 0 and step["limit_tok_s"] > 0
    assert abs(step["pct_of_limit"] - 100 * step["ours_tok_s"] / step["limit_tok_s"]) < 1e-9
