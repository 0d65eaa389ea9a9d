"""The invariance audit behind ``megatron-rl-agg check-invariance``.

Modules (imports go cli -> runner -> plan, batch, report, inject): ``cli`` (the flags and the entry point),
``plan`` (the validated settings), ``runner`` (the torchrun launcher and the worker: reference and layout
gradients), ``batch`` (the fixed mini-batch), ``report`` (measure, table, exit status) and ``inject`` (the
``--inject-bug`` self-test).

One real Megatron-Core GPT model, one fixed RL mini-batch and the same initial weights are run through
one forward-backward in several parallel layouts, for each loss-aggregation mode. Every gradient is
compared with a single-process reference computed from the DEFINITION of the mode
(:func:`megatron_rl_agg.core.aggregation.aggregate` on full-vocabulary log-probs, plain autograd, no
Megatron schedule, no DDP, no global weights), and the audit prints a mode x layout table of the largest
relative gradient difference with PASS/FAIL at a tolerance. Exit status: 0 all PASS, 1 any FAIL,
2 bad arguments or nothing could run.

Launching (see docs/audit.md)::

    megatron-rl-agg check-invariance                     # CPU or GPUs: re-launches itself under torchrun,
                                                         # one launch per process count the layouts need
    torchrun --nproc-per-node 2 -m megatron_rl_agg.cli check-invariance --layouts "dp2+m2 tp2 pp2vpp2m4"
                                                         # already under torchrun (world size W): runs
                                                         # the layouts that need exactly W processes

Layout grammar (:mod:`megatron_rl_agg.parallel.layout`). A layout is a list of factors ``dp<N>``, ``tp<N>``,
``pp<N>``, ``vpp<N>`` (virtual stages per pipeline rank), ``cp<N>`` (context parallelism: each row split
into ``2 N`` zigzag chunks), ``ep<N>`` (expert parallelism, needs ``--num-experts``) and ``m<N>``
(micro-batches per DP rank), each at most once, written together
(``pp2vpp2m4``) or joined by ``+`` (``pp2+vpp2+m4``); omitted factors are 1 (no virtual stages), except
``m`` with virtual stages, which defaults to ``pp`` (the interleaved schedule needs a multiple of ``pp``).
Layouts are separated by ``,``, ``;`` or whitespace, inside one ``--layouts`` value or across several:
``--layouts dp2,m4,tp2,pp2,pp2vpp2`` is five layouts; ``cp2 cp2+dp2 cp2+tp2 cp2+pp2`` are four CP
layouts. A layout needs ``dp * tp * pp * cp * ep`` processes: the factors multiply, so ``ep2+dp2`` is 4
processes, each expert on one of 2 EP ranks and replicated on 2 (Megatron's data-parallel size, over
which rows are split, is ``dp * ep``). ``--calculate-per-token-loss`` runs every layout with Megatron's
``calculate_per_token_loss=True`` (the loss returns its 3-tuple).

MoE (``--num-experts N``, top-k routing with ``--moe-router-topk``, ``--moe-token-dispatcher-type``):
every MLP is a Megatron MoE layer; the aux load-balancing loss is off, because it is Megatron's own
per-micro-batch term and not part of the plugin's loss (tests/megatron/test_moe_grads.py checks it).

What a row checks. The loss is the plugin's full RL loss: PPO clipped policy gradient + ``kl_coef`` x KL
- ``entropy_coef`` x entropy, all three with gradient. By default KL and entropy are aggregated with the
audited mode too (``--kl-aggregation same``), so the whole objective is layout-independent and the
reference is one gradient per mode. ``token_mean_legacy`` and ``microbatch_mean`` terms are
per-micro-batch means BY DEFINITION; their reference uses the layout's micro-batch split (the mean over
the ``dp * m`` micro-batches of each micro-batch's token mean), so a PASS there means "Megatron's plain
averaging, reproduced exactly", not "independent of the layout".

Self-test (``--inject-bug``). Deliberately wrong correction factors, to show the audit catches them:

* ``kl_times_microbatches``: the KL term of every micro-batch is multiplied by the number of
  micro-batches ``m`` (as if the policy term's ``M * D`` factor were also applied to a term already
  averaged by Megatron). Layouts with ``m > 1`` must FAIL (when ``--kl-coef`` > 0).
* ``local_token_count``: the global weights are computed from this DP rank's counts only (tokens, live
  rows, group sizes of the rank) instead of the counts summed over the DP group. Layouts with ``dp > 1``
  must FAIL for every mode that has a global count (all but ``token_sum``, ``token_mean_legacy``).
* ``cp_token_count``: the global weights are counted over the dp x cp group instead of the DP group
  (every CP rank of a DP rank holds the same full rows, so each row is counted ``cp`` times). Layouts with
  ``cp > 1`` must FAIL for every mode that has a global count.
"""
