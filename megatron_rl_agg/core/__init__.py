"""The pure-torch core: the math of one process, with the formulas, shapes and paper variants.

Never imports Megatron-Core, ``torch.distributed`` or any other part of the package
(``tests/test_purity.py``). Modules: ``aggregation`` (the registry of loss-aggregation modes and the
reference value of a mini-batch), ``config`` (``LossConfig``, ``AdvantageConfig`` and their flags),
``policy_losses`` (the policy-gradient terms per token), ``kl`` (the KL-estimator registry), ``logits``
(full-vocabulary log-probs and entropy), ``advantages`` (group moments and coefficients), ``metrics`` (the
metric-name reduction rule), ``context_parallel`` (zigzag indices), ``rows`` (DP shards and row padding),
``seeds`` (counter-based seeds) and ``validate`` (shared argument checks).
"""
