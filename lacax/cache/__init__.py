"""KV-cache policies: one module per method, shared plan helpers in one place, a registry by name.

  kv_cache.py   the `KVCache` pytree, `init_cache`, `gather_slots` (the one gather every plan goes through);
  base.py       `CachePolicy`, the interface (and `WindowScoredPolicy`, the SnapKV-style prompt compressor);
  plans.py      the shared plan helpers: `apply_plan`, `topk_keep_plan`, `recent_mask`, `pool_scores`, ...;
  full.py, streaming.py, ladder.py (LaCache), h2o.py, tova.py, snapkv.py, pyramidkv.py, finch.py, kvmerger.py,
  knorm.py, random_policy.py, keydiff.py, lagkv.py, cur.py, leverage.py, qfilter.py, expected_attention.py
                one method each (the last eight are kvpress's scorers, on `base.ScorerPolicy`); a method
                module imports the shared helpers only, never a sibling;
  think.py, simlayerkv.py
                ThinK (key-channel pruning) and SimLayerKV (lazy layers), on the forward's recorded statistics;
  adakv.py, criticaladakv.py, perlayer.py, composed.py, chunk.py, chunkkv.py, block.py, decoding.py,
  prefill_decoding.py, key_rerotation.py, criticalkv.py
                wrappers over any scorer policy (`base.WrapperPolicy`; the inner policy is a field, built
                by name in the registry: cache.policy="adakv", cache.inner="snapkv");
  registry.py   the policies by name, built from a config's `cache` section at one budget.

Adding a method is one module plus one `registry.POLICIES` entry; `tests/test_cache_contract.py` then checks
it against every invariant the other policies keep.
"""
