# The paper's Gemma-2-2B setup (arXiv 2604.06495 §2; the README lists our choices where it is silent):
# Matryoshka BatchTopK, 4096 latents, L0 in {20, 40, 80, 160}, 500M tokens, layer 12, p = 0.3.
# google/gemma-2-2b is gated: accept the license on its hub page and export HF_TOKEN first.
#   python prepare.py configs/gemma2_2b.py
#   python train.py configs/gemma2_2b.py                                            # masked
#   python train.py configs/gemma2_2b.py --mask_prob=0.0 --out_dir=out/gemma2_2b_p0    # baseline

# prepare.py
model = "google/gemma-2-2b"
model_dir = "data/gemma-2-2b"
dataset = "monology/pile-uncopyrighted"
tokens_dir = "data/pile-gemma"
max_tokens = 520_000_000
val_fraction = 0.01                       # 5M held-out tokens

# train.py
layer = 12
out_dir = "out/gemma2_2b_p0.3"
mask_prob = 0.3
mask_token = "<mask>"                     # id 4 in Gemma's vocabulary, never in ordinary text
ctx_len = 1024
llm_batch_rows = 8
buffer_tokens = 2**18                     # 1.1 GiB of bf16 activations on the device
llm_dtype = "bfloat16"                    # SAEBench runs Gemma-2 in bf16
arch = "matryoshka_batchtopk"
ks = [20, 40, 80, 160]
dict_size = 4096
total_tokens = 500_000_000
batch_size = 2048
lr = 3e-4
warmup_steps = 1000
dead_tokens = 10_000_000
threshold_start = 1000
scale_tokens = 204_800
log_interval = 1000
ckpt_interval = 10_000
