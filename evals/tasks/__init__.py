"""The evaluations: passkey, RULER-style tasks, perplexity, LongBench and prefill latency."""
