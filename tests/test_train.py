"""train.py: masked harvesting, the training loop, resume, DDP and bad input.

Every test trains on the embedded offline default (prepare.py's tiny random GPT-NeoX and its
standard-library tokens), shrunk so that a run takes seconds.
"""
import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import model as model_lib
import prepare
import sae as sae_lib
import train
from configurator import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_settings(tiny, out_dir, *overrides):
    return [f"--model_dir={tiny}/model", f"--tokens_dir={tiny}/tokens", f"--out_dir={out_dir}",
            "--ctx_len=64", "--llm_batch_rows=8", "--buffer_tokens=2048", "--batch_size=256",
            "--total_tokens=7680", "--ks=[4, 8]", "--dict_size=256", "--warmup_steps=5",
            "--threshold_start=5", "--dead_tokens=2560", "--log_interval=10", "--ckpt_interval=10",
            "--scale_tokens=1024", *overrides]


def harvester(tiny, **settings):
    import configurator
    cfg = configurator.configure(vars(train), fast_settings(tiny, "unused"))
    for k, v in settings.items():
        setattr(cfg, k, v)
    m = model_lib.load(cfg.model_dir)
    mask_id = prepare.single_token_id(prepare.load_tokenizer(cfg.model_dir), cfg.mask_token)
    return train.Harvester(m, cfg, mask_id, rank=0, world=1), m, mask_id


# --- masking (paper.md §1, §5) ---------------------------------------------------------------

def test_mask_fraction_matches_mask_prob_and_never_touches_special_tokens():
    rows = torch.randint(2, 1000, (64, 512))
    rows[:, 0] = 0                       # BOS
    rows[:, 100::97] = 0                 # EOS between documents
    eligible = rows != 0
    masked_rows, masked = train.mask_tokens(rows, eligible, 0.3, 1, train.mask_generator(0, 0, 0))
    fraction = masked.sum().item() / eligible.sum().item()
    assert abs(fraction - 0.3) < 0.01
    assert not masked[~eligible].any()
    assert torch.equal(masked_rows[~masked], rows[~masked])
    assert (masked_rows[masked] == 1).all()


def test_mask_rng_depends_on_seed_rank_and_batch_only():
    rows = torch.randint(2, 1000, (8, 64))
    eligible = torch.ones_like(rows, dtype=torch.bool)
    draw = lambda *key: train.mask_tokens(rows, eligible, 0.3, 1, train.mask_generator(*key))[1]
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))


def test_mask_prob_zero_harvest_is_bit_identical_to_the_unmasked_model(tiny):
    h, m, _ = harvester(tiny, mask_prob=0.0)
    rows = h.read_rows()
    acts = h.next_acts()
    expected = m.resid_post(rows, h.cfg.layer)[m.valid_mask(rows)]
    assert torch.equal(acts, expected)
    assert not (rows[:, 1:] == m.cfg.bos_token_id).all()  # the rows hold real text


def test_masking_happens_before_the_forward_pass(tiny):
    h, m, mask_id = harvester(tiny, mask_prob=0.3)
    rows = h.read_rows()
    valid = m.valid_mask(rows)
    masked_rows, masked = train.mask_tokens(rows, valid, 0.3, mask_id, train.mask_generator(0, 0, 0))
    acts = h.next_acts()
    assert torch.equal(acts, m.resid_post(masked_rows, h.cfg.layer)[valid])
    # causal model: a position before the row's first masked token sees clean text
    first = int(masked[0].nonzero()[0])
    clean = m.resid_post(rows, h.cfg.layer)
    dirty = m.resid_post(masked_rows, h.cfg.layer)
    assert torch.equal(clean[0, :first], dirty[0, :first])
    assert not torch.allclose(clean[0, first:], dirty[0, first:])


def test_masked_positions_can_be_dropped_as_an_ablation(tiny):
    kept, m, _ = harvester(tiny, mask_prob=0.3)
    dropped, _, _ = harvester(tiny, mask_prob=0.3, train_on_masked=False)
    n_kept, n_dropped = len(kept.next_acts()), len(dropped.next_acts())
    assert n_dropped == n_kept - dropped.tokens_masked


# --- the loop ---------------------------------------------------------------------------------

def test_sae_step_keeps_the_dead_counters_and_sets_the_threshold():
    """The bookkeeping after a step, checked against the dense latents of the same forward pass:
    a latent that fired is reset to 0 tokens, every other one ages by the batch; an unset
    threshold takes the smallest kept activation (training.md §1.9, §1.11)."""
    import configurator
    cfg = configurator.configure(vars(train), ["--batch_size=64", "--threshold_start=0", "--dead_tokens=10000"])
    s = sae_lib.SAE(16, 32, arch="batchtopk", k=2, seed=0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idx, vals = s.training_loss(x)[2]  # the kept latents: flat indices into (64, 32), values
    dead = torch.full((32,), 100)
    optimizer = torch.optim.Adam(s.parameters(), lr=1e-3, fused=True)
    train.sae_step(s, s.training_loss, optimizer, dead, x, 0, 1e-3, cfg, 1, torch.autocast("cpu", enabled=False))
    fired = torch.zeros(32, dtype=torch.bool).index_fill_(0, idx[vals > 0] % 32, True)
    assert 0 < fired.sum() < 32
    assert torch.equal(dead, torch.where(fired, 0, 164))
    assert s.threshold.item() == vals[vals > 0].min().item()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_in_a_loop():
    """A loop that allocates and frees the same big tensors every step (a training step does) stops
    faulting pages in once malloc keeps freed memory. glibc's default maps fresh pages each time:
    one fault per 4 KiB page, 24576 for these 96 MiB, every step."""
    train.keep_freed_memory()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**24).fill_(1.0), torch.empty(2**23).fill_(1.0)  # 64 + 32 MiB, freed at once
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert faults[-1] < 1000, faults


def test_training_writes_one_loadable_sae_per_k(tiny, tmp_path, capsys):
    train.main(fast_settings(tiny, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "step 30/30" in out and "realised mask fraction" in out
    h, m, _ = harvester(tiny, mask_prob=0.0)
    x = torch.cat([h.next_acts() for _ in range(4)])
    for k in (4, 8):
        s = sae_lib.load(tmp_path / "run" / f"k{k}")
        assert s.cfg["k"] == k and s.cfg["mask_prob"] == 0.3 and s.cfg["layer"] == 2
        assert s.cfg["scale"] != 1.0 and s.threshold > 0  # scale folded, threshold learned
        l0 = (s.encode(x) != 0).sum(-1).float().mean().item()
        assert 0.3 * k < l0 < 3 * k, l0
        fvu = (x - s(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert fvu < 1.0


def test_a_killed_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    train.main(fast_settings(tiny, tmp_path / "straight"))

    real_save, saves = train.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the step-20 checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(fast_settings(tiny, tmp_path / "killed"))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.main(fast_settings(tiny, tmp_path / "killed", "--resume=True"))
    for k in (4, 8):
        a = load_file(tmp_path / "straight" / f"k{k}" / "sae.safetensors")
        b = load_file(tmp_path / "killed" / f"k{k}" / "sae.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


def test_resume_refuses_a_changed_config_and_names_the_keys(tiny, tmp_path):
    train.main(fast_settings(tiny, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"(?s)mask_prob.*lr"):
        train.main(fast_settings(tiny, tmp_path / "run", "--resume=True", "--mask_prob=0.1", "--lr=0.01"))
    with pytest.raises(FileExistsError, match="--resume=True"):
        train.main(fast_settings(tiny, tmp_path / "run"))


def test_auto_llm_dtype_is_recorded_resolved_so_resume_compares_the_dtype_that_ran(tiny, tmp_path):
    short = ("--total_tokens=2560", "--ks=[4]")  # one checkpoint, at step 10
    train.main(fast_settings(tiny, tmp_path / "auto", *short, "--llm_dtype=auto"))
    _, meta = train._read(tmp_path / "auto" / "checkpoint" / "state.safetensors")
    assert meta["config"]["llm_dtype"] == "float32"  # auto on the tiny GPT-NeoX: fp32 on any device
    for same in ("auto", "float32"):  # the same dtype, however it is spelled
        train.main(fast_settings(tiny, tmp_path / "auto", *short, "--resume=True", f"--llm_dtype={same}"))
    train.main(fast_settings(tiny, tmp_path / "bf16", *short, "--llm_dtype=bfloat16"))
    with pytest.raises(ValueError, match="llm_dtype: checkpoint 'bfloat16', now 'float32'"):
        train.main(fast_settings(tiny, tmp_path / "bf16", *short, "--resume=True"))  # auto: fp32 here


def test_compiled_step_runs_on_cpu(tiny, tmp_path):
    train.main(fast_settings(tiny, tmp_path / "compiled", "--compile=on", "--total_tokens=2560",
                             "--ks=[4]"))
    assert os.path.exists(tmp_path / "compiled" / "k4" / "sae.safetensors")


def test_torchrun_two_ranks_on_cpu_matches_one_process(tiny, tmp_path):
    """Each rank harvests its own shard and selects top-k within its half batch (training.md §3),
    so the runs see different data: they agree in quality, not bit for bit."""
    settings = fast_settings(tiny, tmp_path / "ddp", "--total_tokens=25600", "--ks=[8]")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), *settings], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    train.main(fast_settings(tiny, tmp_path / "single", "--total_tokens=25600", "--ks=[8]"))
    h, _, _ = harvester(tiny, mask_prob=0.0)
    x = torch.cat([h.next_acts() for _ in range(8)])
    fvu = {}
    for run in ("ddp", "single"):
        s = sae_lib.load(tmp_path / run / "k8")
        fvu[run] = ((x - s(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu["ddp"] < 1.0 and abs(fvu["ddp"] - fvu["single"]) < 0.05, fvu


# --- bad input: one clear error, nothing written --------------------------------------------

@pytest.mark.parametrize("override, error, message", [
    ("--mask_probb=0.3", ConfigError, "unknown setting 'mask_probb'"),
    ("--mask_prob=high", ConfigError, "'mask_prob' must be float"),
    ("--mask_prob=1.5", ConfigError, r"mask_prob must be in \[0, 1\)"),
    ("--ks=[4, 0]", ConfigError, "positive"),
    ("--arch=jumprelu", ConfigError, "arch must be one of"),
    ("--llm_dtype=fp16", ConfigError, "llm_dtype must be one of"),
    ("--layer=9", ValueError, "layer 9 is out of range"),
    ("--mask_token=hello world", ValueError, "hello world"),
    ("--mask_token=<|endoftext|>", ValueError, "special ids"),
    ("--tokens_dir=/nonexistent/tokens", FileNotFoundError, "/nonexistent/tokens"),
    ("--model_dir=/nonexistent/model", FileNotFoundError, "/nonexistent/model"),
])
def test_bad_settings_fail_clearly_before_writing_anything(tiny, tmp_path, override, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train.main(fast_settings(tiny, out, override))
    assert not out.exists()
