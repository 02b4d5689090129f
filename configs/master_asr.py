"""Master-ASR (arXiv 2306.15686) on the offline eSpeak NG corpus: stage 1, stage 2 and all baselines.

  python -m experiments.run --config=configs/master_asr.py:cpu
  python -m experiments.run --config=configs/master_asr.py            # larger: more data, model and steps
  python -m experiments.run --config=configs/master_asr.py:tiny       # seconds; the integration test's size

Pipeline (lacax/jobs/master_asr.py): build / reuse the corpus; stage 0 trains a dense multilingual encoder on
the training languages (the stand-in for a pretrained XLSR-53); stage 1 continues from it with every method
(dense, master_asr, adapters, s3router); stage 2 adds each held-out low-resource language to each method
(master_asr: selection rows + head only; master_asr_head_only: the new rows frozen at random, the ablation;
adapters; s3router; full_ft of the dense model). Writes a table, results.json, selections.png and a
recognizer (recognizer.npz) that configs/transcribe.py uses.
Variants: "" (about 8 languages x 600 utterances, d=192, 6 layers), "cpu" (8 x 200, d=128, 4 layers: well
under an hour on 2 idle cores), "tiny" (3 + 1 languages, a handful of steps).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "master_asr"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.seed = 0
  # Finished stages are saved here; rerunning with the same work_dir resumes ("" = <run dir>/stages).
  c.work_dir = ""
  # "" = ~/.cache/lacax/asr_corpus (reused between runs: synthesis is cached by content hash).
  c.corpus = ml_collections.ConfigDict(dict(
      cache_dir="", languages=("de", "es", "fr", "it", "pt", "nl", "pl", "en"), new_languages=("ca", "ro"),
      num_train=600, num_dev=40, num_test=80, new_num_train=80, min_words=2, max_words=3, max_seconds=2.5,
      number_fraction=0.2))
  c.model = ml_collections.ConfigDict(dict(d_model=192, num_layers=6, num_heads=4, ffn_dim=768, n_mels=40,
                                           pos_conv_kernel=16, pos_conv_groups=4))
  c.max_labels = 48
  # Master-ASR: K specialists, t = 0.3 on q/k/v/o. S3-Router: one mask per language on the FFN (its reference
  # layout, fix_attn=true) at 10% sparsity (its best single-language sparsity). Adapters: bottleneck h.
  c.masks = ml_collections.ConfigDict(dict(num_specialists=4, sparsity=0.3, init_noise=1.0,
                                           s3router_targets=("fc1", "fc2"), s3router_sparsity=0.1))
  c.adapter_dim = 32
  c.methods = ("dense", "master_asr", "adapters", "s3router")
  c.stage2_methods = ("master_asr", "master_asr_head_only", "adapters", "s3router", "full_ft")
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, stage0_steps=2500, stage1_steps=1200, stage2_steps=300, lr=1e-3, stage2_lr=2e-3,
      select_lr_mult=10.0, select_every=5, phase_every=100, spec_augment=True))
  if arg == "cpu":
    c.corpus.update(num_train=200, num_dev=20, num_test=40, new_num_train=60, min_words=1, max_words=3,
                    max_seconds=2.0)
    c.model.update(d_model=128, num_layers=4, ffn_dim=512)
    c.train.update(stage0_steps=800, stage1_steps=400, stage2_steps=150)
    c.train.phase_every = 50
  elif arg == "tiny":
    c.corpus.update(languages=("de", "es", "it"), new_languages=("ca",), num_train=40, num_dev=0, num_test=10,
                    new_num_train=20, min_words=1, max_words=2, max_seconds=1.6)
    c.model.update(d_model=48, num_layers=2, num_heads=4, ffn_dim=96, pos_conv_kernel=8)
    c.masks.num_specialists = 3
    c.adapter_dim = 8
    c.train.update(batch_size=8, stage0_steps=250, stage1_steps=30, stage2_steps=20, phase_every=10, lr=3e-3)
    c.train.spec_augment = False
  elif arg not in (None, ""):
    raise ValueError(f"configs/master_asr.py variant {arg!r} is unknown; expected '', 'cpu' or 'tiny'")
  return c
