"""train.py's activation cache (activation_cache=<dir>) and the seed split (seed vs data_seed).

The cache must hand the SAE exactly the stream the LLM would: every test compares SAEs trained
from the cache with SAEs trained on the live harvest, bit for bit.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import fast_settings
from test_train import harvester


def weights(run):
    return {k: load_file(os.path.join(run, f"k{k}", "sae.safetensors")) for k in (4, 8)}


def assert_same_saes(a, b):
    wa, wb = weights(a), weights(b)
    for k in wa:
        for name in wa[k]:
            assert torch.equal(wa[k][name], wb[k][name]), (k, name)


def no_llm(monkeypatch):
    """From here on every LLM batch must come from the cache."""
    def refuse(self):
        raise AssertionError(f"LLM batch {self.batches_done} was harvested, not read from the cache")
    monkeypatch.setattr(train.Harvester, "harvest", refuse)


@pytest.fixture(scope="module")
def live(tiny, tiny_run, tmp_path_factory):
    """Uncached runs of the fast settings: the reference every cached run must equal."""
    folder = tmp_path_factory.mktemp("live")
    runs = {"masked": tiny_run}
    for name, extra in {"dropped": ("--train_on_masked=False",), "seed1": ("--seed=1",)}.items():
        train.main(fast_settings(tiny, folder / name, *extra))
        runs[name] = folder / name
    return runs


def test_a_cached_run_trains_the_same_saes_as_the_live_harvest(tiny, tmp_path, live, monkeypatch, capsys):
    cache = tmp_path / "cache"
    train.main(fast_settings(tiny, tmp_path / "writes", f"--activation_cache={cache}"))
    assert "activation cache" in capsys.readouterr().out  # the size line, before writing
    assert_same_saes(live["masked"], tmp_path / "writes")
    chunks = sorted(os.listdir(cache / "rank0"))
    assert chunks[0] == "00000000.safetensors" and not [c for c in chunks if c.endswith(".tmp")]
    chunk = load_file(cache / "rank0" / chunks[0])
    assert chunk["acts"].dtype == torch.float32 and chunk["acts"].shape[1] == 128  # fp32 LLM: fp32 cache
    assert chunk["masked"].dtype == torch.bool and 0.2 < chunk["masked"].float().mean() < 0.4
    key = json.loads((cache / "key.json").read_text())
    assert key["mask_prob"] == 0.3 and key["data_seed"] == 0 and len(key["tokens"]["sha256"]) == 64
    no_llm(monkeypatch)
    train.main(fast_settings(tiny, tmp_path / "reads", f"--activation_cache={cache}"))
    assert_same_saes(live["masked"], tmp_path / "reads")


def test_the_ablation_reads_the_masked_arms_cache(tiny, tmp_path, live, monkeypatch):
    """train_on_masked=False drops the masked positions of the same cache: no second harvest."""
    cache = tmp_path / "cache"
    train.main(fast_settings(tiny, tmp_path / "masked", f"--activation_cache={cache}", "--total_tokens=12800"))
    no_llm(monkeypatch)
    train.main(fast_settings(tiny, tmp_path / "dropped", f"--activation_cache={cache}", "--train_on_masked=False"))
    assert_same_saes(live["dropped"], tmp_path / "dropped")


def test_two_sae_seeds_on_one_cache_differ_only_in_init_and_order(tiny, tmp_path, live, monkeypatch):
    cache = tmp_path / "cache"
    train.main(fast_settings(tiny, tmp_path / "seed0", f"--activation_cache={cache}"))
    no_llm(monkeypatch)  # seed moves neither the masks nor the rows: the same cache serves seed 1
    train.main(fast_settings(tiny, tmp_path / "seed1", f"--activation_cache={cache}", "--seed=1"))
    assert_same_saes(live["seed1"], tmp_path / "seed1")
    assert not torch.equal(weights(tmp_path / "seed0")[4]["W_enc"], weights(tmp_path / "seed1")[4]["W_enc"])
    cfg = json.loads((tmp_path / "seed1" / "k4" / "cfg.json").read_text())
    assert (cfg["seed"], cfg["data_seed"]) == (1, 0)


def test_a_killed_writer_leaves_a_prefix_the_resumed_run_completes(tiny, tmp_path, live, monkeypatch):
    """Killed while writing chunk 12 (after the step-10 checkpoint): the chunks before it are whole,
    its tmp file is ignored, and --resume=True ends on the uninterrupted run's weights."""
    cache, real_write = tmp_path / "cache", train.write_chunk

    def die_in_chunk_12(path, acts, masked):
        if path.endswith("00000012.safetensors"):
            open(f"{path}.{os.getpid()}.tmp", "wb").write(b"half a chunk")
            raise KeyboardInterrupt
        real_write(path, acts, masked)

    monkeypatch.setattr(train, "write_chunk", die_in_chunk_12)
    with pytest.raises(KeyboardInterrupt):
        train.main(fast_settings(tiny, tmp_path / "run", f"--activation_cache={cache}"))
    chunks = sorted(c for c in os.listdir(cache / "rank0") if c.endswith(".safetensors"))
    assert chunks == [f"{i:08d}.safetensors" for i in range(12)]
    assert os.path.exists(tmp_path / "run" / "checkpoint")
    monkeypatch.setattr(train, "write_chunk", real_write)
    train.main(fast_settings(tiny, tmp_path / "run", f"--activation_cache={cache}", "--resume=True"))
    assert_same_saes(live["masked"], tmp_path / "run")
    no_llm(monkeypatch)  # and the completed cache serves a fresh run alone
    train.main(fast_settings(tiny, tmp_path / "again", f"--activation_cache={cache}"))
    assert_same_saes(live["masked"], tmp_path / "again")


def test_a_cache_of_another_harvest_is_refused_with_one_line(tiny, tmp_path):
    cache = tmp_path / "cache"
    short = ("--total_tokens=2560", "--ks=[4]", f"--activation_cache={cache}")
    train.main(fast_settings(tiny, tmp_path / "first", *short))
    with pytest.raises(ValueError) as error:
        train.main(fast_settings(tiny, tmp_path / "other_p", *short, "--mask_prob=0.1", "--data_seed=2"))
    assert str(error.value) == (f"activation_cache {cache} holds another harvest: it differs in mask_prob "
                                f"(cache 0.3, now 0.1), data_seed (cache 0, now 2); choose another "
                                f"activation_cache folder or delete this one")
    assert not (tmp_path / "other_p").exists()  # refused before anything was written
    tokens = tmp_path / "tokens"  # the same size, one token changed
    shutil.copytree(tiny / "tokens", tokens)
    ids = np.memmap(tokens / "train.bin", dtype=json.loads((tokens / "meta.json").read_text())["dtype"], mode="r+")
    ids[100] = ids[101]
    ids.flush()
    with pytest.raises(ValueError, match=r"differs in tokens train.bin; choose") as error:
        train.main(fast_settings(tiny, tmp_path / "other_tokens", *short, f"--tokens_dir={tokens}"))
    assert "\n" not in str(error.value)


def test_a_moved_token_file_is_hashed_again_and_still_matches(tiny, tmp_path, monkeypatch):
    cache, tokens = tmp_path / "cache", tmp_path / "tokens"
    shutil.copytree(tiny / "tokens", tokens)
    short = ("--total_tokens=2560", "--ks=[4]", f"--activation_cache={cache}", f"--tokens_dir={tokens}")
    train.main(fast_settings(tiny, tmp_path / "a", *short))
    hashed = []
    real = train.file_identity
    monkeypatch.setattr(train, "file_identity", lambda path, known=None: hashed.append(
        known is None or known["mtime_ns"] != os.stat(path).st_mtime_ns) or real(path, known))
    train.main(fast_settings(tiny, tmp_path / "b", *short))
    assert not any(hashed)  # unchanged files: the recorded hashes are reused
    os.utime(tokens / "train.bin")  # touched: hashed again, same content, accepted
    train.main(fast_settings(tiny, tmp_path / "c", *short))
    assert sum(hashed) == 1


def test_the_cache_size_is_printed_and_a_small_disk_refused(tiny, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"has 0.0 GiB free but the cache needs 0.\d\d GiB more; choose a folder"):
        train.main(fast_settings(tiny, tmp_path / "run", f"--activation_cache={cache}"))
    line = capsys.readouterr().out.splitlines()[-1]
    # 7680 SAE tokens + a 2048-token buffer: 20 LLM batches of 8 x 63 positions, + 1, x 128 dims x 4 bytes
    assert line == (f"activation cache {cache}: up to 10,584 tokens x 128 x 4 bytes (float32) = 0.01 GiB, "
                    f"0.00 GiB there already, 0.0 GiB free")
    assert os.listdir(cache / "rank0") == []


def test_every_filter_reads_the_same_cache_as_the_live_harvest_gives(tiny, tmp_path):
    """The chunks hold all valid positions; train_on_masked and the outlier filter act on reading."""
    writer, _, _ = harvester(tiny, mask_prob=0.3)
    writer.cache = str(tmp_path)
    for _ in range(3):
        writer.next_acts()
    for settings in [dict(train_on_masked=False), dict(outlier_norm_ratio=1.2),
                     dict(train_on_masked=False, outlier_norm_ratio=1.2)]:
        live, _, _ = harvester(tiny, mask_prob=0.3, **settings)
        cached, _, _ = harvester(tiny, mask_prob=0.3, **settings)
        cached.cache, cached.harvest = str(tmp_path), None  # harvesting would fail
        kept = 0
        for _ in range(3):
            a, b = live.next_acts(), cached.next_acts()
            assert torch.equal(a, b)
            kept += len(a)
        assert kept < cached.tokens_eligible  # the filter dropped positions the cache holds
        assert (cached.tokens_masked, cached.tokens_eligible) == (live.tokens_masked, live.tokens_eligible)


def test_a_full_disk_while_writing_a_chunk_stops_the_run_with_the_cache_whole(tiny, tmp_path, monkeypatch):
    import errno
    cache, real_replace = tmp_path / "cache", train.prepare._replace

    def full_at_chunk_3(tmp, path):
        if path.endswith("00000003.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(tmp, path)

    monkeypatch.setattr(train.prepare, "_replace", full_at_chunk_3)
    with pytest.raises(OSError, match=r"could not write activation cache chunk .*00000003.safetensors: "
                                      r"\[Errno 28\] No space left on device. The chunks before it are whole"):
        train.main(fast_settings(tiny, tmp_path / "run", f"--activation_cache={cache}"))
    assert sorted(os.listdir(cache / "rank0")) == [f"{i:08d}.safetensors" for i in range(3)]  # no tmp left


# --- the seed split ----------------------------------------------------------------------------

def test_seed_leaves_the_harvest_alone_and_data_seed_moves_the_masks(tiny):
    batches = {}
    for seeds in [(0, 0), (5, 0), (0, 1)]:
        h, _, _ = harvester(tiny, mask_prob=0.3, seed=seeds[0], data_seed=seeds[1])
        batches[seeds] = h.harvest()
    assert all(torch.equal(a, b) for a, b in zip(batches[0, 0], batches[5, 0]))
    assert not torch.equal(batches[0, 0][1], batches[0, 1][1])  # other masks


# --- bf16 autocast for the SAE step -------------------------------------------------------------

def test_sae_autocast_is_bf16_only_where_the_device_has_bf16_units(monkeypatch):
    native = train.model_lib.resolve_dtype("auto", "gemma3", "cpu") == "bfloat16"
    assert train.sae_autocast_context("cpu", True)._enabled == native  # this CPU's own answer
    assert not train.sae_autocast_context("cpu", False)._enabled
    monkeypatch.setattr(train.model_lib, "resolve_dtype", lambda setting, arch, device: "bfloat16")
    context = train.sae_autocast_context("cpu", True)  # as on a CPU with AVX512_BF16 or AMX
    assert context._enabled and context.fast_dtype == torch.bfloat16
    s = train.sae_lib.SAE(16, 64, k=4, seed=0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    cfg = train.configurator.configure(vars(train), ["--batch_size=64"])
    optimizer = torch.optim.Adam(s.parameters(), lr=1e-3, fused=True)
    stats = train.sae_step(s, s.training_loss, optimizer, torch.zeros(64, dtype=torch.long), x, 1, 1e-3, cfg, 1,
                           context)
    assert torch.isfinite(stats["loss"]) and s.W_enc.dtype == torch.float32  # bf16 math, fp32 weights


def test_two_ranks_share_one_cache_each_in_its_own_folder(tiny, tmp_path):
    """torchrun on CPU: rank 0 checks the key, each rank writes and reads its own chunks, and the
    cached run equals the live one bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = tmp_path / "cache"
    for run, extra in [("live", ()), ("writes", (f"--activation_cache={cache}",)),
                       ("reads", (f"--activation_cache={cache}",))]:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(root, "train.py"), *fast_settings(tiny, tmp_path / run, *extra)],
                       check=True, cwd=root, env=env, stdout=subprocess.DEVNULL)
    assert sorted(os.listdir(cache)) == ["key.json", "rank0", "rank1"]
    assert json.loads((cache / "key.json").read_text())["world"] == 2
    assert_same_saes(tmp_path / "live", tmp_path / "writes")
    assert_same_saes(tmp_path / "live", tmp_path / "reads")
