"""Every shipped config file is valid for every stage that reads it: no unknown keys, no wrong
types (a typo in a real-run config would otherwise surface only on a GPU machine)."""
import glob

import pytest

import configurator
import evaluate
import prepare
import train

CONFIGS = sorted(glob.glob("configs/*.py"))


def test_the_real_run_configs_are_shipped():
    assert {"configs/tiny.py", "configs/pythia160m.py", "configs/gemma2_2b.py", "configs/saebench.py"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("stage", [prepare, train, evaluate], ids=["prepare", "train", "evaluate"])
def test_config_file_is_valid_for_every_stage(path, stage):
    cfg = configurator.configure(vars(stage), [path])
    assert vars(cfg).keys() == configurator.defaults(vars(stage)).keys()


def test_saebench_config_names_the_papers_tasks():
    cfg = configurator.configure(vars(evaluate), ["configs/pythia160m.py", "configs/saebench.py"])
    assert cfg.download and cfg.core_dataset == "openwebtext" and cfg.layer == 8
    assert len(cfg.probing_tasks) == 8 and len(cfg.scr_runs) == 8 and len(cfg.tpp_tasks) == 2
    assert len(cfg.ood_tasks) == 8
