# The paper's experiment in miniature on 2 CPU cores (README, "The CPU miniature"): Gemma 3 270M
# layer 6, both arms x 3 seeds, the paper's four L0 targets trained from one harvest per run.
# Everything not set here is the offline default (configs/gemma3_270m.py), evaluation included.
#   python prepare.py
#   for s in 0 1 2; do for p in 0.0 0.3; do
#     python train.py configs/miniature.py --seed=$s --mask_prob=$p --out_dir=out/mini_p${p}_s$s
#   done; done
#   python evaluate.py configs/miniature.py out/mini_p0.0_s* out/mini_p0.3_s*
# Budget: one run harvests ~1.1k tok/s and steps four SAEs at ~1.8k tok/s on one core, so
# 800 steps of 1024 tokens take ~25 minutes a run; the 1M-token train.bin is read once, no epoch
# wraps. The paper trains 4096 latents on 500M tokens: these SAEs see 1/600 of that.
ks = [20, 40, 80, 160]                   # the paper's L0 targets
total_tokens = 819_200                   # 800 steps of 1024
dead_tokens = 16_384                     # 2% of total_tokens, as the paper's 10M of 500M
comparison_file = "out/mini_comparison.md"
