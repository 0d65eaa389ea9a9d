"""Run real Megatron-Core on CPU with the gloo backend: the CPU redirects of Megatron's CUDA call sites.

Megatron-Core assumes CUDA in a handful of kinds of call sites even when the model is built with
``use_cpu_initialization=True``. :func:`enable_cpu_mode` redirects exactly those kinds of calls to
the CPU, and only in a process where ``torch.cuda.is_available()`` is False: there every redirected
call would otherwise raise ``AssertionError: Torch not compiled with CUDA enabled``, so no working
code path can change meaning. With CUDA present it does nothing.

The redirects are plain function wrappers installed once per process (a ``TorchFunctionMode``
would also work but costs more per call and is thread-local). Each one is documented where it is
installed, and ``docs/megatron_cpu.md`` lists them with the settings CPU runs need. :func:`device` is
the device the model's tensors live on (the current CUDA device, or the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys
import types

import torch

__all__ = ["enable_cpu_mode", "cpu_mode_enabled", "device"]

_CPU_MODE = False

# Tensor factories that Megatron calls with a literal device="cuda" (or torch.device("cuda")):
# torch.zeros / torch.tensor in schedules.py (total_num_tokens), optimizer.py (loss scale),
# clip_grads.py (norm buffers), utils.local_multi_tensor_l2_norm; torch.ones in
# transformer/utils.py (causal mask); the *_like and random ones in less common paths.
_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has installed the CPU redirects in this process."""
    return _CPU_MODE


def device() -> torch.device:
    """The device tensors for the model live on: the current CUDA device, or the CPU in CPU mode."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def enable_cpu_mode() -> bool:
    """Redirect Megatron-Core's CUDA call sites to the CPU; idempotent.

    No-op (returns False) when CUDA is available. Otherwise installs, once per process:

    1. ``torch.cuda.current_device()`` -> ``"cpu"``;
    2. ``torch.cuda.synchronize()`` -> no-op;
    3. tensor factories given ``device="cuda"`` -> ``device="cpu"``, and ``pin_memory=True`` -> False, in
       Megatron's modules only (their global ``torch`` becomes a view of torch with those factories; other
       libraries see torch as is);
    4. ``Tensor.cuda()`` -> the tensor itself;
    5. ``Tensor.type()`` (no argument) on a CPU tensor -> the ``torch.cuda.*`` type name;
    6. Megatron's CUDA RNG tracker -> a tracker that forks the CPU generator;
    7. ``torch.cuda.current_stream()`` -> ``torch.cpu.current_stream()`` (megatron-core >= 0.19).
    8. MoE (megatron-core 0.16): the router GEMM's missing ``te_general_gemm`` -> None (Megatron's
       own ``torch.mm`` path); ``torch.cuda.Stream`` / ``stream`` -> a CPU
       stand-in stream whose waits, events and contexts do nothing; the alltoall dispatcher's
       split sizes -> host numpy arrays, as its device-to-host step makes them on a GPU; the
       uneven (split-size) all-gather / reduce-scatter along the first dimension (expert tensor
       parallelism) -> equal-size collectives on padded chunks, since gloo has no uneven ones.

    Returns True when CPU mode is (now) active.
    """
    global _CPU_MODE
    if torch.cuda.is_available():
        return False
    if _CPU_MODE:
        return True
    _redirect_current_device()
    _redirect_synchronize()
    _redirect_factories()
    _redirect_tensor_cuda()
    _redirect_tensor_type()
    _install_cpu_rng_tracker()
    _redirect_current_stream()
    _redirect_moe_router_gemm()
    _redirect_cuda_streams()
    _redirect_moe_split_sizes()
    _redirect_uneven_first_dim_collectives()
    _CPU_MODE = True
    return True


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, str):
        return dev == "cuda" or dev.startswith("cuda:")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _redirect_current_device() -> None:
    # p2p_communication.py (shape and receive buffers), param_and_grad_buffer.py (the DDP grad
    # buffer), tensor_parallel/layers.py + mappings.py (TP gather buffers), gpt_model.py and the
    # rotary embedding all pass device=torch.cuda.current_device() to tensor factories or .to().
    # Returning "cpu" puts those tensors where the model lives.
    torch.cuda.current_device = lambda: "cpu"


def _redirect_synchronize() -> None:
    # p2p_communication.py calls torch.cuda.synchronize() after batch_isend_irecv to guard against
    # a race between CUDA streams. CPU kernels are synchronous and every gloo request is waited on
    # before its buffer is read, so there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None


class _MegatronTorch(types.ModuleType):
    """What the name ``torch`` means inside Megatron-Core's modules in CPU mode: the real ``torch`` module
    for every attribute except the tensor factories of ``_FACTORIES``, which map ``device="cuda"`` to
    ``device="cpu"``. Only Megatron's module globals are pointed at it, so ``torch.tensor`` & co. stay the
    untouched originals for every other library (a global wrapper made transformers' ``from_pretrained``
    leave rotary ``inv_freq`` buffers uninitialized: wrong logits, no error)."""

    def __init__(self):
        super().__init__("torch", getattr(torch, "__doc__", None))
        for name in _FACTORIES:
            original = getattr(torch, name)

            @functools.wraps(original)
            def factory(*args, _original=original, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and _is_cuda_device(dev):
                    kwargs["device"] = "cpu"
                # rope_utils.get_pos_emb_on_this_cp_rank (RoPE under context parallelism) builds its index
                # tensor with pin_memory=True, which raises without CUDA; there is no pinned memory to want.
                if kwargs.get("pin_memory"):
                    kwargs["pin_memory"] = False
                return _original(*args, **kwargs)

            setattr(self, name, factory)

    def __getattr__(self, name):
        return getattr(torch, name)


_MEGATRON_TORCH: "_MegatronTorch | None" = None


def _point_at_cpu_torch(module) -> None:
    """Rebind the global ``torch`` of one ``megatron.*`` module to the CPU-mode view."""
    if getattr(module, "__dict__", {}).get("torch") is torch:
        module.torch = _MEGATRON_TORCH


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Points every ``megatron.*`` module imported after :func:`enable_cpu_mode` at the CPU-mode view too,
    right after the module body runs (Megatron imports some modules lazily, inside functions)."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module, _original=original):
            _original(module)
            _point_at_cpu_torch(module)

        # A per-module loader proxy: the original loader object (shared by every module of a path
        # finder) is left alone.
        proxy = types.SimpleNamespace(create_module=loader.create_module, exec_module=exec_module)
        for attr in ("get_resource_reader", "is_package", "get_source", "get_code", "get_filename"):
            if hasattr(loader, attr):
                setattr(proxy, attr, getattr(loader, attr))
        spec.loader = proxy
        return spec


def _redirect_factories() -> None:
    # Literal device="cuda" in Megatron's tensor factories (see _FACTORIES). The wrapper only
    # rewrites the device keyword; positional arguments and every other keyword pass through. It is
    # installed only where Megatron looks the factories up (its modules' global ``torch``), never on the
    # torch module itself.
    global _MEGATRON_TORCH
    _MEGATRON_TORCH = _MegatronTorch()
    for name, module in list(sys.modules.items()):
        if name == "megatron" or name.startswith("megatron."):
            _point_at_cpu_torch(module)
    sys.meta_path.insert(0, _MegatronImportHook())


def _redirect_tensor_cuda() -> None:
    # language_module.py (tied embeddings under pipeline parallelism) moves the duplicated output
    # weight with weight.data.cuda() before all-reducing it over the embedding group; the tensor is
    # already on the only device there is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _redirect_tensor_type() -> None:
    # optimizer/clip_grads.py asserts param.grad.type() == "torch.cuda.FloatTensor", and the
    # mixed-precision optimizer dispatches on "torch.cuda.{Half,BFloat16,Float}Tensor". Report the
    # CUDA name for CPU tensors in the no-argument form; conversions (t.type(dtype)) are untouched.
    original = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _install_cpu_rng_tracker() -> None:
    # tensor_parallel/random.py keeps named CUDA generator states ("model-parallel-rng" for dropout
    # inside TP regions, "data-parallel-rng", "expert-parallel-rng") and forks into them with
    # torch.cuda.get_rng_state / set_state. On CPU the named states are CPU generator states and a
    # fork swaps the CPU default generator. The module-level state getters used by activation
    # recomputation are redirected to the CPU generator as well.
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's RNG state tracker with every named state a CPU generator state."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} already exists in the tracker")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} already exists in the tracker")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"RNG state {name!r} was never added; added: {sorted(self.states_)}")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mp_random.initialize_rng_tracker(force_reset=True)


def _redirect_current_stream() -> None:
    # megatron-core 0.19, param_and_grad_buffer.start_grad_sync: before reducing a bucket group it
    # takes torch.cuda.current_stream() and waits on the CUDA-graph events of its parameters (none
    # exist without CUDA graphs). torch.cpu.current_stream() is torch's device-agnostic stand-in: its
    # wait_event / wait_stream / record_event return at once, which is exact on the CPU, where every
    # kernel has finished when its call returns.
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()


def _redirect_moe_router_gemm() -> None:
    # transformer/moe/moe_utils.py imports te_general_gemm only when Transformer Engine imports, yet
    # RouterGatingLinearFunction tests `te_general_gemm is not None` (NameError without TE; the name
    # is defined as None upstream from 0.17). None selects Megatron's own torch.mm/addmm path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on the CPU: kernels run in order on the host, so waiting
    on a stream or an event has nothing to wait for. A class, not a factory function: other libraries
    use ``torch.cuda.Stream`` in annotations (``torch.cuda.Stream | None``) and ``isinstance`` checks."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> "_CpuStream":
        return self                    # an event: synchronize()/query()/wait() as below

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream=None) -> None:
        pass


def _redirect_cuda_streams() -> None:
    # transformer/moe/token_dispatcher.py (alltoall dispatcher): a class-level torch.cuda.Stream()
    # for the device-to-host copy of the split sizes, wait_stream on it, `with torch.cuda.stream(...)`,
    # record_event() and event.synchronize() (torch.cuda.current_stream() is redirected above). Without
    # CUDA each of these raises; on the CPU every copy is synchronous, so a no-op stream serves all.
    original_stream_context = torch.cuda.stream

    def stream_context(stream):
        if stream is None or isinstance(stream, (_CpuStream, torch.cpu.Stream)):
            return contextlib.nullcontext()
        return original_stream_context(stream)

    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = stream_context


def _redirect_moe_split_sizes() -> None:
    # The alltoall dispatcher passes its split sizes through moe_utils.maybe_move_tensor_to_cpu,
    # which moves only CUDA tensors: on a GPU they arrive at all_to_all_single as host numpy arrays
    # (as_numpy=True); on the CPU they would stay tensors, which the collective does not accept as
    # split sizes. Give CPU tensors the same host form.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move


def _redirect_uneven_first_dim_collectives() -> None:
    # tensor_parallel/mappings.py: with split sizes, _gather_along_first_dim calls all_gather on a
    # list of unequal tensors and _reduce_scatter_along_first_dim calls reduce_scatter on one (the
    # MoE dispatchers' expert-TP gather of [tokens_r, h] and its backward). NCCL takes unequal
    # sizes; gloo rejects them ("invalid tensor size"). Pad every chunk to the largest size n,
    # run the equal-size collective, keep each chunk's real rows: the same values, exactly.
    import torch.distributed as torch_dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def padded(chunk, n):
        return torch.cat([chunk, chunk.new_zeros((n - chunk.shape[0],) + tuple(chunk.shape[1:]))])

    @functools.wraps(gather)
    def gather_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        n = max(sizes)
        out = input_.new_empty((n * len(sizes),) + tuple(input_.shape[1:]))
        torch_dist.all_gather_into_tensor(out, padded(input_.contiguous(), n), group=group)
        return torch.cat([out[r * n:r * n + size] for r, size in enumerate(sizes)])

    @functools.wraps(reduce_scatter)
    def reduce_scatter_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        n = max(sizes)
        chunks = torch.split(input_, sizes, dim=0)
        out = input_.new_empty((n,) + tuple(input_.shape[1:]))
        torch_dist.reduce_scatter_tensor(out, torch.cat([padded(c, n) for c in chunks]), group=group)
        return out[:sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_first_dim
