"""Megatron-Core glue: the loss function for Megatron's schedules, and the model at any layout.

The loss: ``batch`` (``prepare_microbatches``: global weights and checks once per mini-batch), ``loss``
(``loss_func``, ``make_loss_func``, ``forward_step``), ``logprobs`` (the fused vocab-parallel log-prob and
entropy kernel), ``setup_checks`` (refusals of unsupported Megatron settings). The model: ``spec``
(``GPTSpec``, TransformerConfig, layer specs), ``build`` (model chunks, DDP, optimizer), ``weights``
(layout-independent initialization, gathers for tests and export), ``forward`` (forward-only passes).
Attention variants: ``packing`` / ``packed_attention`` (THD sequence packing), ``cp_attention`` (context
parallelism on the local spec). Releases and machines: ``compat`` (process groups, release shims, the
live layout), ``cpu_mode`` (real Megatron-Core on a CPU with gloo). Imports ``core`` and ``parallel``.
"""
