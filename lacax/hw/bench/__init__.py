"""Benchmark harness: problems, loaders (VerilogEval v2, RTLLM v2.0, logikbench), pass@k, evaluation."""
