"""The frozen reference policy of the KL term (``--kl-coef > 0``).

A second copy of the model in the same TP / PP / VPP layout as the policy, never updated: the initial
weights of ``--seed`` (the same function of ``(seed, parameter key)`` the policy starts from, so it is the
policy's step-0 state at any layout, also after a resume), or the weights of the checkpoint in
``--ref-load``. Its log-probs are computed with a forward-only pass before the update, on the same
padded rows as the update, and reach every pipeline stage
(:func:`~megatron_rl_agg.mcore.forward.compute_logprobs`).
"""

from __future__ import annotations

import torch

from megatron_rl_agg.mcore import forward

__all__ = ["build_reference", "reference_logprobs"]


def build_reference(spec, layer_spec, *, seed: int, init_fn=None) -> list:
    """Bare (no DDP) model chunks holding the reference weights, in eval mode, without gradients.

    Weights: ``init_fn(chunks)`` when given (the trainer loads the ``--ref-load`` checkpoint or an
    imported Hugging Face checkpoint through it), else the initial weights of ``seed``."""
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.weights import init_weights

    ref = build_model(spec, wrap_ddp=False, layer_spec=layer_spec)
    if init_fn is not None:
        init_fn(ref)
    else:
        init_weights(ref, seed=seed)
    for chunk in ref:
        chunk.eval()
        chunk.requires_grad_(False)
    return ref


def reference_logprobs(ref_chunks: list, tokens: torch.Tensor, labels: torch.Tensor,
                       micro_batch_size: int, *, temperature: float) -> torch.Tensor:
    """``[R, S]`` log-probs ``log softmax(z_ref / T)[label]`` of ``labels`` under the reference policy, on
    every pipeline stage (``T`` the sampling temperature, as in the loss)."""
    return forward.compute_logprobs(ref_chunks, tokens, labels, micro_batch_size, temperature=temperature)
