"""Pin the loss contract of Megatron-Core's schedule and DDP, so a change in a new release is caught.

The plugin's correction factor (``num_microbatches * dp_size`` on the policy term) is derived from what
``forward_step_calc_loss`` (pipeline_parallel/schedules.py), DDP and ``finalize_model_grads`` do with the
value a ``loss_func`` returns. With D the data-parallel size without context parallelism, C the
context-parallel size, M the number of micro-batches, ``l_{r,i}`` the loss of micro-batch i on rank r
of the dp x cp group, ``n_{r,i}`` the integer count of a 3-tuple and ``N = sum n_{r,i}``, the reduced
gradient of a parameter is:

=========================  ==============================================================
return, calculate_per_token_loss   reduced gradient
=========================  ==============================================================
``(l, report)``, False     ``1/(D*C) * sum_{r,i} grad(l_{r,i}) * C / M``
``(l, n, report)``, False  ``1/(D*C) * sum_{r,i} grad(l_{r,i}) / max(n_{r,i}, 1) / M``
``(l, n, report)``, True   ``sum_{r,i} grad(l_{r,i}) / N``
``(l, report)``, True      ``sum_{r,i} grad(l_{r,i}) * C / M`` (no count: no 1/N; D*C times the
                           flag-off value, why ``setup_checks`` refuses the combination)
=========================  ==============================================================

The DDP factor 1/(D*C) is its pre-scale before a SUM over dp x cp; under the flag the pre-scale is 1
and ``finalize_model_grads`` all-reduces N over dp x cp and scales by 1/N. The worker
(``worker_contract.py``) runs the real schedule, DDP and ``finalize_model_grads`` on one parameter
``w`` with ``l_{r,i} = sum(w * x_{r,i})``, so ``grad(l_{r,i}) = x_{r,i}`` and each formula above is a
number computed here from the same data. The layouts dp2 (D=2, C=1) and cp2 (D=1, C=2) tell the C
factor from the D factor; a world of one (in process, in the quick subset) pins M and the clamp.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import worker_contract as worker  # noqa: E402
from torchrun_utils import load_result  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("worker_contract.py")


def expected_grad(length: int, per_token: bool, dp: int, cp: int) -> torch.Tensor:
    """The table of the module docstring, from :func:`worker_contract.case_data` (float64)."""
    m = worker.NUM_MICROBATCHES
    data = [worker.case_data(r, i) for r in range(dp * cp) for i in range(m)]
    xs = [x.double() for x, _ in data]
    if length == 2 and not per_token:
        return sum(x * cp / m for x in xs) / (dp * cp)
    if length == 3 and not per_token:
        return sum(x / max(n, 1) / m for x, (_, n) in zip(xs, data)) / (dp * cp)
    if length == 3:
        return sum(xs) / sum(n for _, n in data)
    return sum(x * cp / m for x in xs)


def test_expected_grad_arithmetic():
    """The formulas written out for one process (D = C = 1, M = 3) and the data of case_data."""
    # rank 0: x_i = [1, 2, 3, 4] + 0.5 i, n_i = 0, 2, 1 (i = 0, 1, 2); sum_i x_i = [4.5, 7.5, 10.5, 13.5]
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.equal(expected_grad(2, False, 1, 1), (3 * base + 1.5) / 3)
    # 3-tuple, flag off: (x_0 / max(0, 1) + x_1 / 2 + x_2 / 1) / 3
    assert torch.allclose(expected_grad(3, False, 1, 1), (base + (base + 0.5) / 2 + (base + 1.0)) / 3)
    # 3-tuple, flag on: sum x / N with N = 0 + 2 + 1
    assert torch.allclose(expected_grad(3, True, 1, 1), (3 * base + 1.5) / 3)
    # cp2: each of the two CP ranks' losses counts C = 2 times, DDP divides by D*C = 2
    two_ranks = (3 * base + 1.5) + (3 * 2 * base + 1.5)
    assert torch.allclose(expected_grad(2, False, 1, 2), two_ranks * 2 / 3 / 2)


@pytest.fixture()
def world_of_one():
    from megatron_rl_agg.mcore import compat

    compat.initialize_distributed()
    yield
    compat.destroy_model_parallel()


@pytest.mark.parametrize("length,per_token", worker.CASES)
def test_contract_one_process(world_of_one, length, per_token):
    grad = worker.run_case(length, per_token, cp=1)
    assert torch.allclose(grad.double(), expected_grad(length, per_token, 1, 1), rtol=1e-6, atol=0), (
        f"megatron-core's schedule/DDP changed the {worker.case_name(length, per_token)} contract: "
        f"gradient {grad.tolist()}, expected {expected_grad(length, per_token, 1, 1).tolist()}"
    )


LAYOUTS = ["dp2", "cp2"]


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(2, WORKER, [directory, *LAYOUTS], 300)]


@pytest.mark.slow
def test_contract_dp2_cp2(shared_jobs):
    import megatron.core

    for layout in LAYOUTS:
        dp, cp = worker.parse(layout)
        for length, per_token in worker.CASES:
            name = worker.case_name(length, per_token)
            result = load_result(shared_jobs, f"{layout}-{name}")
            # The workers import the megatron-core this process imports (scripts/test_compat.sh puts an
            # unpacked release on PYTHONPATH; run_torchrun must keep it).
            assert result["megatron_core"] == megatron.core.__version__
            assert (result["dp"], result["cp"]) == (dp, cp)
            want = expected_grad(length, per_token, dp, cp)
            assert torch.allclose(result["grad"].double(), want, rtol=1e-6, atol=0), (
                f"{layout} {name}: megatron-core {megatron.core.__version__} gives {result['grad'].tolist()}, "
                f"the pinned contract {want.tolist()}"
            )
        # The C factor is not a D factor: at equal world size the 2-tuple gradients differ by exactly
        # the ratio the formulas predict, so a schedule that scaled by D instead of C fails above.
    dp2, cp2 = (load_result(shared_jobs, f"{lay}-2tuple-default")["grad"].double() for lay in LAYOUTS)
    assert torch.allclose(cp2, 2 * dp2, rtol=1e-6), (dp2.tolist(), cp2.tolist())
