"""Every shipped config file is valid for every stage that reads it: no unknown keys, no wrong
types (a typo in a real-run config would otherwise surface only on a GPU machine)."""
from pathlib import Path

import pytest

import configurator
import evaluate
import prepare
import train

CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.py"))


def test_the_real_run_configs_are_shipped():
    assert {"gemma3_270m.py", "tiny.py", "pythia160m.py", "gemma2_2b.py", "saebench.py"} <= {
        Path(p).name for p in CONFIGS}


@pytest.mark.parametrize("stage", [prepare, train, evaluate], ids=["prepare", "train", "evaluate"])
def test_the_default_is_gemma3_270m_spelled_out(stage):
    """configs/gemma3_270m.py changes nothing: it documents the scripts' own defaults."""
    path = str(Path(__file__).resolve().parent.parent / "configs" / "gemma3_270m.py")
    spelled_out, defaults = vars(configurator.configure(vars(stage), [path])), configurator.defaults(vars(stage))
    if stage is evaluate:  # by default it reads model_dir, layer and tokens_dir from each SAE's cfg.json
        assert (defaults["model_dir"], defaults["layer"], defaults["tokens_dir"]) == ("", -1, "")
        for key in ("model_dir", "layer", "tokens_dir"):
            spelled_out[key] = defaults[key]
    assert spelled_out == defaults


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
@pytest.mark.parametrize("stage", [prepare, train, evaluate], ids=["prepare", "train", "evaluate"])
def test_config_file_is_valid_for_every_stage(path, stage):
    cfg = configurator.configure(vars(stage), [path])
    assert vars(cfg).keys() == configurator.defaults(vars(stage)).keys()


def test_saebench_config_names_the_papers_tasks():
    folder = Path(__file__).resolve().parent.parent / "configs"
    cfg = configurator.configure(vars(evaluate), [str(folder / "pythia160m.py"), str(folder / "saebench.py")])
    assert cfg.core_dataset == "openwebtext" and cfg.layer == 8
    assert len(cfg.probing_tasks) == 8 and len(cfg.scr_runs) == 8 and len(cfg.tpp_tasks) == 2
    assert len(cfg.ood_tasks) == 8
    # SAEBench's sizes, not the CPU default's smaller ones
    assert (cfg.core_tokens, cfg.probing_train_per_class, cfg.absorption_max_words, cfg.ood_pool_rows) == (
        4_096_000, 2000, 0, 1500)


@pytest.mark.parametrize("stage", [prepare, train, evaluate], ids=["prepare", "train", "evaluate"])
def test_help_prints_the_docstring_and_every_setting(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        configurator.configure(vars(stage), ["--help"], stage.__doc__)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(stage.__doc__.strip()[:60])
    for key in configurator.defaults(vars(stage)):
        assert f"\n  --{key}=" in out, key


def test_help_explains_a_setting_with_its_comment(capsys):
    with pytest.raises(SystemExit):
        configurator.configure(vars(train), ["--help"], train.__doc__)
    lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert lines["--mask_prob"].endswith("# probability of replacing an eligible input token")
    assert "# CUDA: fp32 matmuls" in lines["--tf32"] and lines["--tf32"].endswith("False = exact fp32")
    assert "#" not in lines["--lr"]  # no comment, none invented
