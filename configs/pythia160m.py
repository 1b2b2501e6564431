# The paper's Pythia-160M setup (arXiv 2604.06495 §2; the README lists our choices where it is silent):
# Matryoshka BatchTopK, 4096 latents, L0 in {20, 40, 80, 160}, 500M tokens, layer 8, p = 0.3.
#   python prepare.py configs/pythia160m.py
#   python train.py configs/pythia160m.py                                          # masked
#   python train.py configs/pythia160m.py --mask_prob=0.0 --out_dir=out/pythia160m_p0  # baseline
#   python evaluate.py out/pythia160m_p0 out/pythia160m_p0.3

# prepare.py: the hub model and the training text
model = "EleutherAI/pythia-160m-deduped"
model_dir = "data/pythia-160m-deduped"
dataset = "monology/pile-uncopyrighted"   # Pile family, as the paper's "Pile-CC" (README: choices)
tokens_dir = "data/pile-pythia"
max_tokens = 520_000_000                  # 500M for training + a margin; wraps around if short
val_fraction = 0.01                       # 5M held-out tokens

# train.py
layer = 8
out_dir = "out/pythia160m_p0.3"
mask_prob = 0.3
mask_token = "<|padding|>"                # id 1: never in text, distinct from BOS/EOS id 0
ctx_len = 1024
llm_batch_rows = 32
buffer_tokens = 2**19                     # 1.5 GiB of fp32 activations on the device
llm_dtype = "float32"                     # SAEBench runs Pythia in fp32
arch = "matryoshka_batchtopk"
ks = [20, 40, 80, 160]
dict_size = 4096
total_tokens = 500_000_000
batch_size = 2048
lr = 3e-4
warmup_steps = 1000
dead_tokens = 10_000_000
threshold_start = 1000
scale_tokens = 204_800                    # 100 batches
log_interval = 1000
ckpt_interval = 10_000
