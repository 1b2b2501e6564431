"""What happens when things go wrong: one clear message, a non-zero exit, no existing file harmed.

Runs the scripts as a user does (subprocesses) where the exit code and the printed message
matter, and in-process where a failure has to be injected at an exact moment.
"""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import configurator
import evaluate
import model as model_lib
import prepare
import sae as sae_lib
import train
from conftest import TINY_CONFIG, fast_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_clear_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def checkpoint_step(out):
    return train._read(str(out / "checkpoint" / "state.safetensors"))[1]["step"]


# --- bad inputs, through the command line -----------------------------------------------------

def test_corrupt_truncated_and_mismatched_weights(tiny, tmp_path):
    for damage in ("truncate", "garbage", "shape"):
        model_dir = tmp_path / damage
        os.system(f"cp -r {tiny}/model {model_dir}")
        weights = model_dir / "model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-1000])
        elif damage == "garbage":
            weights.write_bytes(b"\x00" * 64)
        else:
            config = json.loads((model_dir / "config.json").read_text())
            config["intermediate_size"] = 256
            (model_dir / "config.json").write_text(json.dumps(config))
        before = snapshot(model_dir)
        result = run_script("train.py", *fast_settings(tiny, tmp_path / f"out_{damage}", f"--model_dir={model_dir}"))
        assert_one_clear_error(result, str(model_dir))
        if damage == "shape":
            assert "mlp" in result.stderr  # names the tensor
        assert snapshot(model_dir) == before
        assert not (tmp_path / f"out_{damage}").exists()


def test_nan_model_weights_are_refused_before_anything_is_written(tiny, tmp_path):
    model_dir = tmp_path / "model"
    os.system(f"cp -r {tiny}/model {model_dir}")
    weights = load_file(model_dir / "model.safetensors")
    name = next(n for n in weights if "layers.0." in n and "dense_h_to_4h.weight" in n)
    weights[name][3, 5] = float("nan")
    save_file(weights, model_dir / "model.safetensors")
    result = run_script("train.py", *fast_settings(tiny, tmp_path / "out", f"--model_dir={model_dir}"))
    assert_one_clear_error(result, str(model_dir), "non-finite weights", "mlp")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tiny, tmp_path):
    model_dir = tmp_path / "llama"
    os.system(f"cp -r {tiny}/model {model_dir}")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    result = run_script("train.py", *fast_settings(tiny, tmp_path / "out", f"--model_dir={model_dir}"))
    assert_one_clear_error(result, "LlamaForCausalLM", "GPTNeoXForCausalLM")


def test_token_file_that_does_not_match_the_model(tiny, tmp_path):
    tokens = tmp_path / "tokens"
    os.system(f"cp -r {tiny}/tokens {tokens}")
    meta = json.loads((tokens / "meta.json").read_text())
    meta["vocab_size"] = 50304
    (tokens / "meta.json").write_text(json.dumps(meta))
    result = run_script("train.py", *fast_settings(tiny, tmp_path / "out", f"--tokens_dir={tokens}"))
    assert_one_clear_error(result, "vocab 50304", "do not match")

    meta = json.loads((tiny / "tokens" / "meta.json").read_text())  # ids beyond the vocabulary
    ids = np.memmap(tokens / "train.bin", dtype=meta["dtype"], mode="r+")
    ids[500] = 4095 + 7
    ids.flush()
    (tokens / "meta.json").write_text(json.dumps(meta))
    result = run_script("train.py", *fast_settings(tiny, tmp_path / "out", f"--tokens_dir={tokens}"))
    assert_one_clear_error(result, "train.bin holds token id 4102", "token ids must be in [0, 4096)")
    assert not (tmp_path / "out").exists()  # found before anything is written

    (tokens / "train.bin").write_bytes((tokens / "train.bin").read_bytes()[:-3])  # wrong size
    result = run_script("train.py", *fast_settings(tiny, tmp_path / "out", f"--tokens_dir={tokens}"))
    assert_one_clear_error(result, "train.bin")


def test_hooked_layer_beyond_the_model_and_unknown_settings(tiny, tmp_path):
    assert_one_clear_error(run_script("train.py", *fast_settings(tiny, tmp_path / "o", "--layer=4")),
                           "layer 4 is out of range", "4 blocks")
    assert_one_clear_error(run_script("train.py", "--dict_sise=4096"), "unknown setting 'dict_sise'")
    config = tmp_path / "bad_config.py"
    config.write_text("layer = 2\nmask_prop = 0.3\n")
    assert_one_clear_error(run_script("train.py", config), "unknown setting 'mask_prop'")
    assert not (tmp_path / "o").exists()


def one_line_error(main, argv, monkeypatch, capsys, *fragments):
    """Run main as its script does (configurator.run) and check the user sees one line, no traceback."""
    monkeypatch.setattr(sys, "argv", ["script.py", *map(str, argv)])
    monkeypatch.delenv("TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        configurator.run(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_evaluate_and_bench_report_user_errors_in_one_line(tmp_path):
    assert_one_clear_error(run_script("evaluate.py", tmp_path / "no_such_run"), "no_such_run: no such run folder")
    assert_one_clear_error(run_script("bench.py", "--quik=True"), "unknown setting 'quik'")


def test_evaluate_names_a_broken_model_or_sae_file(tiny, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    os.system(f"cp -r {tiny}/model {model_dir}")
    run = tmp_path / "run"
    sae_lib.save(sae_lib.SAE(128, 64, arch="batchtopk", k=4, model=str(model_dir), layer=1), str(run / "k4"))
    args = [run, f"--tokens_dir={tiny}/tokens", f"--cache_dir={tmp_path}/cache", "--metrics=['core']"]
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": "128"}))
    one_line_error(evaluate.main, args, monkeypatch, capsys, "'hidden_size' must be a positive integer, got '128'")
    (model_dir / "config.json").write_text(json.dumps(config)[:-5])
    one_line_error(evaluate.main, args, monkeypatch, capsys, f"{model_dir}/config.json: not valid JSON")
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    one_line_error(evaluate.main, args, monkeypatch, capsys, f"{model_dir}/tokenizer.json is not a readable tokenizer.json")
    if not torch.cuda.is_available():
        one_line_error(evaluate.main, args + ["--device=cuda"], monkeypatch, capsys, "sees no CUDA GPU")
    (run / "k4" / "cfg.json").write_text("{'k': 4}")
    one_line_error(evaluate.main, args, monkeypatch, capsys, f"{run}/k4/cfg.json: not valid JSON")


def test_bad_settings_and_files_for_train_and_prepare_are_one_line(tiny, tmp_path, monkeypatch, capsys):
    one_line_error(train.main, fast_settings(tiny, tmp_path / "o", "--ks=[0.5]"), monkeypatch, capsys,
                   "'ks' must list int values like its default [20, 80], got 0.5")
    one_line_error(train.main, fast_settings(tiny, tmp_path / "o", "--out_dir="), monkeypatch, capsys,
                   "'out_dir' is empty")
    config = tmp_path / "typo.py"
    config.write_text("layer = = 2\n")
    one_line_error(train.main, [config], monkeypatch, capsys, f"config file '{config}', line 1: invalid syntax")
    assert not (tmp_path / "o").exists()
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (source / name).write_bytes((tiny / "model" / name).read_bytes())
    torch.save([1, 2, 3], source / "pytorch_model.bin")  # loads under weights_only, but is no state dict
    one_line_error(prepare.main, [f"--model={source}", f"--model_dir={tmp_path}/model", f"--tokens_dir={tmp_path}/t"],
                   monkeypatch, capsys, "pytorch_model.bin holds a list, not a state dict")


# --- failures in the middle of a run: the last good checkpoint survives -------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_activations_stop_the_run_and_keep_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, poison):
    out = tmp_path / "run"
    real_save, real_resid = train.save_checkpoint, model_lib.Transformer.resid_post

    def save_then_poison(*args, **kwargs):
        real_save(*args, **kwargs)
        monkeypatch.setattr(model_lib.Transformer, "resid_post",
                            lambda self, *a, **k: real_resid(self, *a, **k) + poison)

    monkeypatch.setattr(train, "save_checkpoint", save_then_poison)
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite activations.*last good checkpoint"):
        train.main(fast_settings(tiny, out))
    state = load_file(out / "checkpoint" / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert json.loads(open(out / "k4" / "cfg.json").read())["k"] == 4


# a full disk as Python reports it, and as safetensors does (its own exception type; the message
# is what safetensors 0.8 says when a write fails: tried with RLIMIT_FSIZE, "File too large")
DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"),
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    real_save_file, calls = train.save_file, []

    def fill_the_disk_on_the_second_checkpoint(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # each checkpoint writes rank0 + state
            raise error
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(train, "save_file", fill_the_disk_on_the_second_checkpoint)
    with pytest.raises(OSError, match="No space left.*previous checkpoint"):
        train.main(fast_settings(tiny, out))
    assert checkpoint_step(out) == 10
    monkeypatch.setattr(train, "save_file", real_save_file)
    before = snapshot(out / "checkpoint")
    train.main(fast_settings(tiny, out, "--resume=True"))  # continues from step 10
    assert before != snapshot(out / "checkpoint")


def test_unwritable_output_folder_fails_before_training(tiny, tmp_path):
    if os.geteuid() == 0:  # root ignores permissions: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "run"
    result = run_script("train.py", *fast_settings(tiny, out))
    assert_one_clear_error(result, str(out))


# Runs train.py and kills it with SIGKILL inside the step-20 checkpoint: after its files are
# written but before any rename ("before_swap"), or after checkpoint -> checkpoint.old but before
# checkpoint.tmp -> checkpoint ("between_renames").
_KILL_DURING_CHECKPOINT = """
import os, sys
import train
where = {"before_swap": "checkpoint", "between_renames": "checkpoint.tmp"}[os.environ["KILL_WHERE"]]
real_replace, real_save, step = os.replace, train.save_checkpoint, [0]
def replace(src, dst):
    if step[0] == 20 and os.path.basename(src) == where:
        os.kill(os.getpid(), 9)
    real_replace(src, dst)
def save(*args, **kwargs):
    step[0] = args[5]
    real_save(*args, **kwargs)
train.os.replace, train.save_checkpoint = replace, save
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["before_swap", "between_renames"])
def test_kill_9_during_a_checkpoint_write_then_resume_matches_an_uninterrupted_run(tiny, tiny_run, tmp_path, where):
    straight, killed = tiny_run, tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(_KILL_DURING_CHECKPOINT)
    env = {**os.environ, "KILL_WHERE": where, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(driver), *fast_settings(tiny, killed)], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == -9, result.stderr
    assert (killed / "checkpoint.tmp").exists()  # the unfinished write is left behind ...
    assert (killed / ("checkpoint" if where == "before_swap" else "checkpoint.old")).exists()
    train.main(fast_settings(tiny, killed, "--resume=True"))  # ... and ignored on resume
    for k in (4, 8):
        a = load_file(straight / f"k{k}" / "sae.safetensors")
        b = load_file(killed / f"k{k}" / "sae.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_killed_between_the_last_checkpoint_and_the_last_export_then_resume_exports(tiny, tiny_run, tmp_path,
                                                                                   monkeypatch):
    """kill -9 after the step-30 (last) checkpoint, while the k4 export is being written: its
    sae.safetensors.tmp is half there and k8 still holds the step-20 export. The resume finds its
    checkpoint at the last step already, trains nothing, and must still end with the exports of
    that last state."""
    straight, killed = tiny_run, tmp_path / "killed"
    real_save, real_export, last = train.save_checkpoint, train.export_sae, []

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        last.append(args[5] == 30)

    def export_or_die(s, scale, folder, *args):
        if last[-1]:
            (tmp_path / "killed" / "k4" / "sae.safetensors.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real_export(s, scale, folder, *args)

    monkeypatch.setattr(train, "save_checkpoint", save)
    monkeypatch.setattr(train, "export_sae", export_or_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(fast_settings(tiny, killed))
    monkeypatch.undo()
    assert checkpoint_step(killed) == 30
    stale = load_file(killed / "k8" / "sae.safetensors")
    train.main(fast_settings(tiny, killed, "--resume=True"))
    for k in (4, 8):
        a = load_file(straight / f"k{k}" / "sae.safetensors")
        b = load_file(killed / f"k{k}" / "sae.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert not list((killed / f"k{k}").glob("*.tmp"))
    assert not torch.equal(stale["W_dec"], load_file(killed / "k8" / "sae.safetensors")["W_dec"])


def test_a_second_train_py_on_the_same_out_dir_stops_and_changes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(fast_settings(tiny, out, "--total_tokens=2560"))  # a checkpoint at step 10
    before = snapshot(out)
    lock = train.lock_out_dir(str(out))  # as a running train.py holds it
    try:
        with pytest.raises(BlockingIOError, match="in use by another train.py"):  # a second open
            train.lock_out_dir(str(out))
        result = run_script("train.py", *fast_settings(tiny, out, "--total_tokens=2560", "--resume=True"))
        assert_one_clear_error(result, f"{out} is in use by another train.py")
        assert snapshot(out) == before
    finally:
        os.close(lock)
    train.main(fast_settings(tiny, out, "--total_tokens=2560", "--resume=True"))  # free again


# --- settings that would train nothing, or diverge (issue 21, defects 1-4 and 10) -----------------

def test_settings_that_train_no_step_or_no_number_are_refused_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    one_line_error(train.main, fast_settings(tiny, out, "--total_tokens=100"), monkeypatch, capsys,
                   "total_tokens (100) is less than one batch (256)")
    one_line_error(train.main, fast_settings(tiny, out, "--lr=1e999"), monkeypatch, capsys,
                   "lr must be a positive finite number, got inf")
    one_line_error(train.main, fast_settings(tiny, out, "--scale_tokens=0"), monkeypatch, capsys,
                   "scale_tokens must be positive")
    one_line_error(train.main, fast_settings(tiny, out, "--ctx_len=4096"), monkeypatch, capsys,
                   "ctx_len=4096 is longer than", "max_position_embeddings=2048")
    # 2^31 latents: 16 TiB of weights and Adam moments, refused with the estimate before any harvest
    one_line_error(train.main, fast_settings(tiny, out, f"--dict_size={2**31}"), monkeypatch, capsys,
                   "the run needs about", "GiB but", "lower batch_size")
    assert not out.exists()


def test_a_run_shorter_than_its_warmup_is_warned_about(tiny, tmp_path, capsys):
    train.main(fast_settings(tiny, tmp_path / "o", "--total_tokens=768"))  # 3 steps, warmup 5
    assert "warning: only 3 steps" in capsys.readouterr().out


@pytest.mark.parametrize("lr,message", [(1e6, "diverged"), (1e30, "loss is nan")])
def test_a_diverging_run_stops_with_one_line_instead_of_exporting(tiny, tmp_path, lr, message):
    out = tmp_path / "o"
    with pytest.raises(FloatingPointError, match=rf"step 10: SAE k4 {message}.*lower lr. No checkpoint was written yet"):
        train.main(fast_settings(tiny, out, f"--lr={lr}"))
    assert not (out / "k4").exists()


def test_relu_without_l1_warmup_trains(tiny, tmp_path):
    out = tmp_path / "o"
    train.main(fast_settings(tiny, out, "--arch=relu", "--l1_coefficients=[0.02]", "--l1_warmup_steps=0",
                             "--total_tokens=2560"))
    assert (out / "l1_0.02" / "sae.safetensors").exists()


def test_tokens_of_another_tokenizer_are_refused(tiny, tmp_path, monkeypatch, capsys):
    tokens = tmp_path / "tokens"
    os.system(f"cp -r {tiny}/tokens {tokens}")
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    one_line_error(train.main, fast_settings(tiny, tmp_path / "o", f"--tokens_dir={tokens}"), monkeypatch, capsys,
                   f"{tokens} was not tokenized with {tiny}/model/tokenizer.json")
    assert not (tmp_path / "o").exists()


# --- evaluate.py: nothing stale, nothing lost (issue 21 defects 5 and 7, issue 17 point 7) ---------

def evaluate_setup(tiny, tmp_path, monkeypatch, seed=0):
    """A run with one random SAE on the tiny model, and a stub core metric that counts its calls."""
    run = tmp_path / "run"
    sae_lib.save(sae_lib.SAE(128, 64, arch="batchtopk", k=4, seed=seed, model=f"{tiny}/model", layer=1), str(run / "k4"))
    calls = []

    def metric(name):
        def runner(llm, saes, cfg):
            calls.append(name)
            return [{"l0": 4.0, "value": len(calls)} for _ in saes]
        return runner

    for name in ("core", "absorption"):
        monkeypatch.setitem(evaluate._RUNNERS, name, metric(name))
    args = [str(run), f"--tokens_dir={tiny}/tokens", f"--cache_dir={tmp_path}/cache", f"--eval_data_dir={tmp_path}/eval",
            "--metrics=['core']"]
    return run, calls, args


def test_eval_json_is_reused_only_when_it_describes_this_sae_data_and_settings(tiny, tmp_path, monkeypatch, capsys):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    evaluate.main(args)
    assert calls == ["core"]
    record = json.loads((run / "k4" / "eval.json").read_text())["computed_from"]["core"]
    assert record["sae_sha256"] == evaluate._file_sha256(run / "k4" / "sae.safetensors")
    assert record["settings"]["core_tokens"] == evaluate.core_tokens and "absorption_max_words" not in record["settings"]
    assert record["model"]["layer"] == 1 and record["data"]["meta_sha256"]
    capsys.readouterr()
    evaluate.main(args)
    assert calls == ["core"] and f"reused core for {run}/k4" in capsys.readouterr().out
    evaluate.main(args + ["--absorption_max_words=10"])  # a setting core does not depend on
    assert calls == ["core"]
    evaluate.main(args[:-1] + ["--metrics=['absorption']"])
    assert calls == ["core", "absorption"]
    later = configurator.configure(vars(evaluate), args[1:-1] + ["--metrics=['absorption']", "--core_tokens=512"])
    results = evaluate.evaluate_group(later,
                                      f"{tiny}/model", 1, f"{tiny}/tokens", [str(run / "k4")], "cpu")
    assert "core" not in results[str(run / "k4")] and "absorption" in results[str(run / "k4")]
    assert f"left core of {run}/k4 out of the report: settings (core_tokens) changed" in capsys.readouterr().out
    assert calls == ["core", "absorption"]  # absorption reused
    calls.remove("absorption")
    evaluate.main(args + ["--core_tokens=4096"])
    assert calls == ["core"] * 2
    assert f"recomputing core for {run}/k4: settings (core_tokens) changed" in capsys.readouterr().out
    sae_lib.save(sae_lib.SAE(128, 64, arch="batchtopk", k=4, seed=1, model=f"{tiny}/model", layer=1), str(run / "k4"))
    evaluate.main(args + ["--core_tokens=4096"])  # retrained with another seed: same settings, new SAE
    assert calls == ["core"] * 3 and ": SAE file changed" in capsys.readouterr().out
    result = json.loads((run / "k4" / "eval.json").read_text())
    del result["computed_from"]["core"]["activations"]  # an eval.json from before the one-token reads
    (run / "k4" / "eval.json").write_text(json.dumps(result))
    evaluate.main(args + ["--core_tokens=4096"])
    assert calls == ["core"] * 4 and "the way the LLM activations are computed changed" in capsys.readouterr().out
    result = json.loads((run / "k4" / "eval.json").read_text())
    del result["computed_from"]  # an eval.json from before the records
    (run / "k4" / "eval.json").write_text(json.dumps(result))
    evaluate.main(args + ["--core_tokens=4096"])
    assert calls == ["core"] * 5 and "does not record what it was computed from" in capsys.readouterr().out


def test_a_run_still_training_is_refused(tiny, tmp_path, monkeypatch, capsys):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    lock = train.lock_out_dir(str(run))  # as a running train.py holds it
    try:
        one_line_error(evaluate.main, args, monkeypatch, capsys, f"{run}/k4 is still training", "train.lock")
    finally:
        os.close(lock)
    evaluate.main(args)  # finished: its lock file stays, unheld
    assert calls == ["core"]


def test_two_evaluations_of_one_sae_with_other_metrics_both_land_in_eval_json(tiny, tmp_path, monkeypatch):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    slow_core = evaluate._RUNNERS["core"]

    def core_while_another_evaluate_writes_absorption(llm, saes, cfg):
        evaluate.main(args[:-1] + ["--metrics=['absorption']"])  # the second process finishes first
        return slow_core(llm, saes, cfg)

    monkeypatch.setitem(evaluate._RUNNERS, "core", core_while_another_evaluate_writes_absorption)
    evaluate.main(args)
    result = json.loads((run / "k4" / "eval.json").read_text())
    assert {"core", "absorption"} <= set(result) and set(result["computed_from"]) == {"core", "absorption"}


def test_a_truncated_activation_cache_file_is_recomputed(tiny, tmp_path, capsys):
    cfg = configurator.configure(vars(evaluate), [f"--cache_dir={tmp_path}/cache"])
    llm = evaluate.load_llm(cfg, str(tiny / "model"), 1, "", "cpu")
    rows = [[llm.m.cfg.bos_token_id, 5, 6, 7], [llm.m.cfg.bos_token_id, 8, 9]]
    acts, counts = evaluate.cached_residuals(llm, rows, "test")
    path, = (tmp_path / "cache").iterdir()
    path.write_bytes(path.read_bytes()[:-100])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / "cache" / f"{path.name}.{int(dead.stdout)}.tmp"  # a write killed halfway
    leftover.write_bytes(b"partial")
    again, again_counts = evaluate.cached_residuals(llm, rows, "test")
    assert torch.equal(acts, again) and torch.equal(counts, again_counts)
    out = capsys.readouterr().out
    assert f"cache file {path} is unreadable" in out and f"removed {leftover}" in out and not leftover.exists()
    assert len(load_file(path)["acts"]) == len(acts)  # written again whole


# --- prepare.py: complete means every file, whole, of the model asked for (issue 21 defects 6, 8, 10)

def tiny_prepare_args(tiny, *overrides):
    return [TINY_CONFIG, f"--model_dir={tiny}/model", f"--tokens_dir={tiny}/tokens", "--max_tokens=300000",
            *overrides]


def test_two_identical_prepare_runs_at_once_both_succeed(tmp_path):
    args = [TINY_CONFIG, f"--model_dir={tmp_path}/model", f"--tokens_dir={tmp_path}/tokens", "--max_tokens=300000",
            "--eval_sets=[]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert prepare.open_tokens(str(tmp_path / "tokens"))[1]["train_tokens"] == 300000
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_eval_set_missing_a_file_is_built_again(tiny, tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    prepare.main(tiny_prepare_args(tiny, f"--eval_data_dir={eval_dir}", "--eval_sets=['stdlib_docs', 'stdlib_kind']"))
    assert "is complete; nothing to do" not in capsys.readouterr().out.split("eval:", 1)[1]  # both just written
    test_rows = (eval_dir / "stdlib_docs" / "test.jsonl").read_bytes()
    (eval_dir / "stdlib_docs" / "test.jsonl").unlink()
    capsys.readouterr()
    prepare.main(tiny_prepare_args(tiny, f"--eval_data_dir={eval_dir}", "--eval_sets=['stdlib_docs']"))
    assert "stdlib_docs is complete" not in capsys.readouterr().out
    assert (eval_dir / "stdlib_docs" / "test.jsonl").read_bytes() == test_rows


def test_a_damaged_model_is_fetched_again_and_another_model_refused(tiny, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    os.system(f"cp -r {tiny}/model {model_dir}")
    weights = (model_dir / "model.safetensors").read_bytes()
    args = tiny_prepare_args(tiny, f"--model_dir={model_dir}", "--eval_sets=[]")
    prepare.main(args)  # nothing to do; now it records which model the folder holds
    assert json.loads((model_dir / "prepared_from.json").read_text())["model"] == "tiny"
    (model_dir / "model.safetensors").write_bytes(weights[:-1000])
    prepare.main(args)
    assert "truncated or damaged; fetching the model again" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").read_bytes() == weights  # the tiny model is seeded
    one_line_error(prepare.main, tiny_prepare_args(tiny, f"--model_dir={model_dir}", "--model=google/gemma-3-270m"),
                   monkeypatch, capsys, f"{model_dir} holds tiny (revision None), not google/gemma-3-270m (revision main)")


# --- sae.py / model.py: a mistaken call gets one line that says what to do (issue 21 defect 9) -----

def test_export_into_the_sae_folder_is_refused_and_a_run_folder_names_its_saes(tmp_path):
    sae = sae_lib.SAE(8, 32, arch="batchtopk", k=4, model="m", layer=1)
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    for k in ("k20", "k80"):
        sae_lib.save(sae, str(tmp_path / "run" / k))
    before = snapshot(tmp_path / "run")
    with pytest.raises(FileExistsError, match="holds an SAE of ours.*export into another folder"):
        sae_lib.export_saelens(sae_lib.load(tmp_path / "run" / "k20"), str(tmp_path / "run" / "k20"))
    assert snapshot(tmp_path / "run") == before and sae_lib.load(tmp_path / "run" / "k20").cfg["k"] == 4
    with pytest.raises(FileNotFoundError, match=f"the SAEs are in {tmp_path}/run/k20, {tmp_path}/run/k80"):
        sae_lib.load(tmp_path / "run")


def test_model_load_names_a_dtype_torch_does_not_know(tiny):
    with pytest.raises(ValueError, match="dtype 'fp16' is not a torch dtype name"):
        model_lib.load(tiny / "model", "cpu", "fp16")


def test_ctrl_c_says_how_to_resume_without_a_traceback_and_checkpoints_are_readable_by_the_group(tiny, tmp_path, monkeypatch, capsys):
    real_save = train.save_checkpoint

    def save_then_ctrl_c(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_ctrl_c)
    monkeypatch.setattr(sys, "argv", ["train.py", *fast_settings(tiny, tmp_path / "o")])
    monkeypatch.delenv("TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        configurator.run(train.main)
    out, err = capsys.readouterr()
    assert exit_.value.code == 130 and err.strip() == "train.py: interrupted"
    assert f"interrupted: {tmp_path}/o/checkpoint holds the last checkpoint; continue with --resume=True" in out
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o" / "checkpoint" / "state.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- rough edges: one line that names the file or the setting ------------------------------------

def test_settings_get_a_did_you_mean_and_constants_are_not_settings(tiny, tmp_path, monkeypatch, capsys):
    one_line_error(evaluate.main, ["--metric=['core']", str(tmp_path)], monkeypatch, capsys, "did you mean metrics")
    one_line_error(prepare.main, ["--SAE_PROBES_TRAIN=()"], monkeypatch, capsys, "unknown setting 'SAE_PROBES_TRAIN'")
    one_line_error(train.main, fast_settings(tiny, tmp_path / "o", "--group_fractions=[0.5, 0.6]"), monkeypatch, capsys,
                   "group_fractions must sum to 1")


def test_a_bad_line_or_a_missing_dataset_names_the_file(tiny, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "broken\n')
    args = tiny_prepare_args(tiny, f"--tokens_dir={tmp_path}/tokens", "--eval_sets=[]")
    one_line_error(prepare.main, args + [f"--dataset={corpus}"], monkeypatch, capsys, f"{corpus}:2: not valid JSON")
    one_line_error(prepare.main, args + [f"--dataset={tmp_path}/none.jsonl"], monkeypatch, capsys,
                   f"dataset '{tmp_path}/none.jsonl': no such file or folder")
    with pytest.raises(ValueError, match=f"{corpus}:2: not valid JSON"):
        prepare.read_rows(str(corpus))


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=f"could not write {tmp_path}/eval.json: No space left on device"):
        evaluate._write_atomic(str(tmp_path / "eval.json"), "{}")
    with pytest.raises(OSError, match=f"could not write {tmp_path}/k4/sae.safetensors: No space left"):
        sae_lib.save(sae_lib.SAE(8, 16, arch="batchtopk", k=4), str(tmp_path / "k4"))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_full_disk_while_tokenizing_names_the_files_and_keeps_the_old_ones(tiny, monkeypatch):
    def tokens_then_full_disk(*args):
        yield np.arange(100, dtype=np.uint16)
        raise OSError(errno.ENOSPC, "No space left on device")

    before = snapshot(tiny / "tokens")
    monkeypatch.setattr(prepare, "tokenized_documents", tokens_then_full_disk)
    with pytest.raises(OSError, match="could not write the token files .*train.bin.tmp.*No space left on "
                                      "device; the previous token files are untouched"):
        prepare.main(tiny_prepare_args(tiny, "--max_tokens=1234", "--eval_sets=[]"))
    assert snapshot(tiny / "tokens") == before  # no partial file, the old ones as they were


def test_prepare_says_which_given_settings_it_ignores(tiny, capsys):
    prepare.main(tiny_prepare_args(tiny, "--revision=step1000", "--eval_sets=[]"))
    assert "note: revision ignored here" in capsys.readouterr().out


def test_runs_that_cannot_be_compared_are_refused_before_any_metric(tiny, tmp_path, monkeypatch, capsys, make_hf_model):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    one_line_error(evaluate.main, args + [str(run)], monkeypatch, capsys, "a run folder is named twice")
    twin = tmp_path / "twin"  # the same arm (mask_prob) and seed as run
    os.system(f"cp -r {run} {twin}")
    one_line_error(evaluate.main, args + [str(twin)], monkeypatch, capsys, "are both arm p=None, seed 0, SAE k4")
    other = tmp_path / "other"
    sae_lib.save(sae_lib.SAE(32, 64, arch="batchtopk", k=4, model=str(make_hf_model("gpt_neox")), layer=1, mask_prob=0.3),
                 str(other / "k4"))
    one_line_error(evaluate.main, args + [str(other)], monkeypatch, capsys, "a comparison needs one model and layer")
    assert calls == []


def test_a_corrupt_eval_json_is_named(tiny, tmp_path, monkeypatch, capsys):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    (run / "k4" / "eval.json").write_text('{"core": ')
    one_line_error(evaluate.main, args, monkeypatch, capsys, f"{run}/k4/eval.json: not valid JSON", "delete it")
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_sae_folder_is_refused_before_any_metric(tiny, tmp_path, monkeypatch, capsys):
    run, calls, args = evaluate_setup(tiny, tmp_path, monkeypatch)
    (run / "k4").chmod(0o500)
    try:
        one_line_error(evaluate.main, args, monkeypatch, capsys, f"{run}/k4 is not writable")
    finally:
        (run / "k4").chmod(0o700)
    assert calls == []
