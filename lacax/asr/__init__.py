"""lacax.asr: a JAX speech stack and Master-ASR (Yu et al., ICML 2023, arXiv 2306.15686).

  espeak.py     eSpeak NG synthesis (ctypes, deterministic, order-independent)
  audio.py      sound files in (resample / down-mix / refuse), WAV out
  corpus.py     the offline multilingual speech corpus: text sources, synthesis, cached JSONL manifests
  vocab.py      text normalisation and growable character vocabularies
  frontend.py   jitted log-mel features and SpecAugment
  ctc.py        CTC loss (optax), greedy decoding, CER / WER
  artisan.py    Artisan layers: specialist scores, selection rows, top-(1-t) masks, STE, diversity init
  model.py      encoders (light conv-subsampled transformer; wav2vec2 stable layer norm) + CTC head
  wav2vec2.py   loading Hugging Face wav2vec2 / XLSR-53 directories into the param pytree
  master_asr.py stage-1 / stage-2 optimisers (selection rows, W/M phases), baselines, parameter accounting
  inference.py  folding masks into dense weights; transcribe(audio, language)

This package imports no JAX at import time of `espeak`/`audio`, so the synthesis worker stays light.
"""
