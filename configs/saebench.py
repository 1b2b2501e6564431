# SAEBench's datasets (v0.6.0 defaults) and SAE-Probes' OOD pairs instead of the offline stdlib
# ones. Add it after a model's config, for prepare.py (which fetches the sets once into
# eval_data_dir) and for evaluate.py:
#   pip install pyarrow && pip install --no-deps sae-probes==0.4.2 zstandard
#   python prepare.py configs/pythia160m.py configs/saebench.py
#   python evaluate.py configs/pythia160m.py configs/saebench.py out/pythia160m_p0 out/pythia160m_p0.3
# The hub datasets need network and pyarrow; the OOD pairs come offline from the sae-probes wheel
# (--no-deps: its declared dependencies would pull in sae-lens, transformer-lens and another torch).

eval_sets = ["bias_in_bios", "amazon_reviews", "amazon_sentiment", "github_code", "ag_news",
             "europarl", "openwebtext", "sae_probes_ood"]  # every folder the tasks below read
core_dataset = "openwebtext"              # SAEBench's core eval text

_BIOS = "bias_in_bios"
probing_tasks = [  # (task name, dataset folder, classes): SAEBench's 8 sparse-probing datasets
    ("bias_in_bios_set1", _BIOS, ["accountant", "architect", "attorney", "dentist", "filmmaker"]),
    ("bias_in_bios_set2", _BIOS, ["journalist", "nurse", "painter", "photographer", "physician"]),
    ("bias_in_bios_set3", _BIOS, ["poet", "professor", "psychologist", "surgeon", "teacher"]),
    ("amazon_reviews", "amazon_reviews", ["Toys_and_Games", "Cell_Phones_and_Accessories",
                                          "Industrial_and_Scientific", "Musical_Instruments", "Electronics"]),
    ("amazon_sentiment", "amazon_sentiment", ["1.0", "5.0"]),
    ("github_code", "github_code", ["C", "Python", "HTML", "Java", "PHP"]),
    ("ag_news", "ag_news", ["0", "1", "2", "3"]),
    ("europarl", "europarl", ["en", "fr", "de", "es", "nl"]),
]
scr_runs = [  # (dataset folder, class 1, class 2, attribute 1, attribute 2)
    (_BIOS, "professor", "nurse", "male", "female"),
    (_BIOS, "architect", "journalist", "male", "female"),
    (_BIOS, "surgeon", "psychologist", "male", "female"),
    (_BIOS, "attorney", "teacher", "male", "female"),
    ("amazon_reviews", "Books", "CDs_and_Vinyl", "1.0", "5.0"),
    ("amazon_reviews", "Software", "Electronics", "1.0", "5.0"),
    ("amazon_reviews", "Pet_Supplies", "Office_Products", "1.0", "5.0"),
    ("amazon_reviews", "Industrial_and_Scientific", "Toys_and_Games", "1.0", "5.0"),
]
tpp_tasks = probing_tasks[0:1] + probing_tasks[3:4]  # bios set 1 and amazon
ood_tasks = [(name, f"sae_probes_ood/id/{name}.jsonl", f"sae_probes_ood/ood/{name}.jsonl") for name in (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "66_living-room",
    "67_social-security", "73_control-group", "87_glue_cola", "90_glue_qnli")]

# SAEBench v0.6.0's sizes (the scripts' defaults are the CPU default's much smaller ones)
core_tokens = 4_096_000                   # 2000 batches of 16 rows of 128 tokens
core_ce_tokens = 409_600                  # 200 batches
core_batch_rows = 16
absorption_max_words = 0                  # every alphabetic token
probing_train_per_class = 2000            # 4000 train / 1000 test texts per one-vs-rest probe
probing_test_per_class = 500
scr_train_per_cell = 1000
scr_test_per_cell = 250
ood_max_tokens = 1024
ood_pool_rows = 1500                      # SAE-Probes: training rows come from the first 1500 ID rows
ood_train_per_class = 512
