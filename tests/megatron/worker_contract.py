"""torchrun worker: the loss contract of Megatron's schedule and DDP, measured on one parameter.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_contract.py OUT_DIR dp2 cp2

For each layout (``dp2``: D=2, C=1; ``cp2``: D=1, C=2; ``dp1``: one process) and each case of
:data:`CASES`, the worker builds a Megatron DDP around a module holding one fp32 parameter
``w [K]``, runs ``get_forward_backward_func()`` (the no-pipelining schedule) over
:data:`NUM_MICROBATCHES` micro-batches and saves ``w``'s reduced gradient (DDP ``main_grad`` after
``finalize_model_grads``). Micro-batch ``i`` of rank ``r`` of the dp x cp group has the data of
:func:`case_data`: ``x [K]`` and an integer token count ``n``; the model computes ``w * x`` and the
loss function returns ``(sum(w * x), report)`` (2-tuple) or ``(sum(w * x), n, report)`` (3-tuple),
so the per-micro-batch loss gradient is exactly ``x`` and the saved gradient is a known linear
combination of the ``x``: the combination is the contract (tests/megatron/test_megatron_contract.py
writes it out). Rank 0 saves ``OUT_DIR/<layout>-<case>.pt`` with the gradient, the layout sizes and the
megatron-core version this process imported.
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.mcore import compat  # noqa: E402

K = 4
NUM_MICROBATCHES = 3
# (tuple length of the loss_func return, TransformerConfig.calculate_per_token_loss)
CASES = [(2, False), (3, False), (3, True), (2, True)]


def case_name(length: int, per_token: bool) -> str:
    return f"{length}tuple-{'per_token' if per_token else 'default'}"


def case_data(rank: int, microbatch: int) -> tuple[torch.Tensor, int]:
    """``x [K]`` (exact binary fractions) and the token count ``n`` (0 for some, to hit the clamp)."""
    x = torch.arange(1.0, K + 1.0) * (rank + 1) + 0.5 * microbatch
    return x, (rank + 2 * microbatch) % 3


def parse(text: str) -> tuple[int, int]:
    """``"dp2"`` -> (dp=2, cp=1); ``"cp2"`` -> (1, 2); ``"dp1"`` -> (1, 1)."""
    sizes = {"dp": 1, "cp": 1}
    if text[:2] not in sizes or not text[2:].isdigit():
        raise ValueError(f"layout {text!r}: expected 'dp<N>' or 'cp<N>'")
    sizes[text[:2]] = int(text[2:])
    return sizes["dp"], sizes["cp"]


def run_case(length: int, per_token: bool, cp: int) -> torch.Tensor:
    """One forward-backward over NUM_MICROBATCHES micro-batches; returns w's reduced gradient ``[K]``.

    Needs torch.distributed initialised (``compat.initialize_distributed``); sets up
    parallel_state with context-parallel size ``cp`` (dp = world / cp) and tears it down again.
    """
    import torch.distributed as torch_dist
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    compat.initialize_model_parallel(cp=cp)
    try:
        config = TransformerConfig(
            num_layers=1, hidden_size=K, num_attention_heads=1, context_parallel_size=cp,
            use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
            calculate_per_token_loss=per_token, **compat.transformer_config_defaults(),
        )

        class OneParameter(MegatronModule):
            """``forward(x) = w * x`` with ``w [K]`` initialised to ones."""

            def __init__(self):
                super().__init__(config)
                self.model_type = ModelType.encoder_or_decoder   # what the schedules look up
                self.weight = torch.nn.Parameter(torch.ones(K))
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(self.weight)

            def set_input_tensor(self, input_tensor):
                """No pipeline stages here: nothing arrives from a previous stage."""

            def forward(self, x):
                return self.weight * x

        ddp = DistributedDataParallel(
            config=config, module=OneParameter(),
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=False),
        )
        config.no_sync_func = ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        rank = torch_dist.get_rank()   # tp = pp = 1: the global rank enumerates the dp x cp group
        data = [case_data(rank, i) for i in range(NUM_MICROBATCHES)]

        def forward_step(data_iterator, model):
            x, n = next(data_iterator)
            out = model(x)

            def loss_func(output):
                loss = output.sum()
                if length == 2:
                    return loss, {"loss": loss.detach()}
                return loss, torch.tensor(n, dtype=torch.int), {"loss": loss.detach()}

            return out, loss_func

        ddp.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=[ddp],
            num_microbatches=NUM_MICROBATCHES, seq_length=K, micro_batch_size=1,
        )
        return ddp.module.weight.main_grad.detach().clone()
    finally:
        compat.destroy_model_parallel()


def run(argv: list[str]) -> None:
    """``argv = [out_dir, *layouts]`` in a process group that is up (``tests/worker_jobs.py``)."""
    import megatron.core
    import torch.distributed as torch_dist

    out_dir, layouts = argv[0], argv[1:]
    for text in layouts:
        dp, cp = parse(text)
        if dp * cp != torch_dist.get_world_size():
            raise ValueError(f"layout {text!r} needs {dp * cp} processes, got {torch_dist.get_world_size()}")
        for length, per_token in CASES:
            grad = run_case(length, per_token, cp)
            if torch_dist.get_rank() == 0:
                save_result(out_dir, f"{text}-{case_name(length, per_token)}",
                            {"grad": grad, "dp": dp, "cp": cp, "megatron_core": megatron.core.__version__})


def main(out_dir: str, layouts: list[str]) -> None:
    import torch.distributed as torch_dist

    compat.initialize_distributed()
    run([out_dir, *layouts])
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
