# The embedded offline default, spelled out (these are also the scripts' own defaults):
# a tiny GPT-NeoX with RANDOM weights and a BPE tokenizer trained on Python's standard library,
# so the whole pipeline runs on a CPU with no download. Its numbers mean nothing about the paper;
# they only show that every stage works. configs/pythia160m.py and configs/gemma2_2b.py are the
# real runs.
#   python prepare.py configs/tiny.py && python train.py configs/tiny.py && python evaluate.py out/tiny

model = "tiny"
model_dir = "data/tiny/model"
dataset = "stdlib"
tokens_dir = "data/tiny/tokens"

layer = 2
out_dir = "out/tiny"
mask_prob = 0.3
mask_token = "<|padding|>"
ks = [8, 16]
dict_size = 1024
total_tokens = 1_000_000
batch_size = 1024
dead_tokens = 20_000  # 2% of total_tokens, as the paper's 10M of 500M: dead latents and aux-k occur
