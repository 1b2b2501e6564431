# The paper's experiment in miniature on 2 CPU cores (README, "The CPU miniature of the paper"):
# Gemma 3 270M layer 6, both arms x 3 seeds, the paper's four L0 targets trained from one harvest
# per run. Everything not set here is the offline default (configs/gemma3_270m.py), evaluation
# included. As measured (1 h 41 min): each arm on one core, each run evaluated as it finishes
# (evaluate.py keeps eval.json and the activation cache, so the last command only compares).
#   python prepare.py
#   arm() { for s in 0 1 2; do
#     OMP_NUM_THREADS=1 python train.py configs/miniature.py --seed=$s --mask_prob=$1 --out_dir=out/mini_p$1_s$s &&
#     OMP_NUM_THREADS=1 python evaluate.py configs/miniature.py out/mini_p$1_s$s || return 1; done; }
#   arm 0.0 & arm 0.3 & wait
#   python evaluate.py configs/miniature.py out/mini_p0.0_s* out/mini_p0.3_s*
# Budget: on one core a run harvests ~1k tok/s and steps four SAEs at ~1.8k tok/s, so 800 steps
# of 1024 tokens take 21-27 minutes; the 1M-token train.bin is read once, no epoch wraps. The
# paper trains 4096 latents on 500M tokens: these SAEs see 1/600 of that.
ks = [20, 40, 80, 160]                   # the paper's L0 targets
total_tokens = 819_200                   # 800 steps of 1024
dead_tokens = 16_384                     # 2% of total_tokens, as the paper's 10M of 500M: the window that
                                         # leaves the fewest latents dead (README, The dead window)
comparison_file = "out/mini_comparison.md"
