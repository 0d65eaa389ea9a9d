"""What spans ranks: every collective, the layout grammar, and the quantities reduced over ranks.

``dist`` is the only module of the package outside the Megatron glue that calls ``torch.distributed`` (named
wrappers, a traffic counter, the world barrier); ``layout`` is the one grammar of parallel layouts
(``dp2+m2``, ``pp2vpp2m4``) used by the trainer, the model builder and the audit; ``weights`` (global
per-token aggregation weights), ``advantages`` (group-normalized advantages across data-parallel ranks) and
``metrics`` (exact reduction of loss reports) build on the core math. Imports only ``core``.
"""
