"""Inference engines that sample rollouts for the trainer: vLLM's HTTP client (``client``), a server the
trainer launches and stops (``server``), and weight sync strategies with the engine's version (``sync``).
See docs/engine.md."""
