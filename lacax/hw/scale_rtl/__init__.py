"""ScaleRTL (arXiv 2506.05566) test-time scaling for RTL generation, over any backend.

  rules.py     the general RTL rules (VerilogEval v2's prompt rules) and the reflection cues built from them
  reflect.py   budget-forced reflection: N rounds or a thinking-token budget, from the same KV cache (local
               backend) or the raw prefix (completions endpoint); the simulator-feedback variant is an extension
  scaling.py   repeated sampling and the pass@k-vs-compute curve (tokens generated as compute)
  traces.py    offline reasoning traces for reflection: injected bugs, critiques, simulated corrections
  planted.py   a scripted backend that writes a planted bug first and fixes it after a cue (tests, :tiny job)
"""
