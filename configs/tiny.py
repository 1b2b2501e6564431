# The seconds-long smoke run, and what the tests run on: a tiny GPT-NeoX with RANDOM weights and a
# BPE tokenizer trained on Python's standard library, with evaluation sets made from the standard
# library's docstrings. No download, no extra package. Its numbers mean nothing about the paper;
# they only show that every stage works (configs/gemma3_270m.py, the default, is a trained model).
#   python prepare.py configs/tiny.py && python train.py configs/tiny.py && python evaluate.py configs/tiny.py out/tiny

# prepare.py
model = "tiny"
model_dir = "data/tiny/model"
dataset = "stdlib"
tokens_dir = "data/tiny/tokens"
max_tokens = 3_000_000
val_fraction = 0.01
eval_sets = ["stdlib_docs", "stdlib_kind"]

# train.py
layer = 2
out_dir = "out/tiny"
mask_prob = 0.3
mask_token = "<|padding|>"
ctx_len = 128
llm_batch_rows = 32
buffer_tokens = 32768
ks = [8, 16]
dict_size = 1024
total_tokens = 1_000_000
batch_size = 1024
warmup_steps = 100
dead_tokens = 20_000  # 2% of total_tokens, as the paper's 10M of 500M: dead latents and aux-k occur
threshold_start = 100
scale_tokens = 32768
log_interval = 50
ckpt_interval = 500

# evaluate.py (every set built from the standard library: prepare.py's stdlib_docs, stdlib_kind)
core_tokens = 4_096_000
core_ce_tokens = 409_600
core_batch_rows = 16
absorption_max_words = 0
_STDLIB = ("stdlib_docs", "stdlib_docs", ["asyncio", "email", "importlib", "logging", "tkinter"])
probing_tasks = [_STDLIB]
probing_train_per_class = 2000
probing_test_per_class = 500
scr_runs = [("stdlib_docs", "asyncio", "email", "plain", "comment"),
            ("stdlib_docs", "importlib", "logging", "plain", "comment")]
scr_train_per_cell = 1000
scr_test_per_cell = 250
tpp_tasks = [_STDLIB]
ood_tasks = [("stdlib_kind_upper", "stdlib_kind/id.jsonl", "stdlib_kind/ood_upper.jsonl"),
             ("stdlib_kind_reversed", "stdlib_kind/id.jsonl", "stdlib_kind/ood_reversed.jsonl")]
ood_max_tokens = 1024
ood_pool_rows = 1500
ood_train_per_class = 512
