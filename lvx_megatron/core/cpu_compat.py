"""Lets real megatron-core 0.19 code run on machines without CUDA (CPU tests, laptops).

``enable_cpu_compat()`` is idempotent and does nothing when CUDA is available. Nothing in torch
is patched: the few megatron modules that call ``torch.cuda.*`` or build tensors on
``device="cuda"`` see their module-global ``torch`` replaced by a stand-in that forwards
everything to torch except a handful of ``torch.cuda`` functions and tensor factories given a
CUDA device; the model-parallel RNG tracker keeps its named states in the CPU generator.
With it, parallel_state (TP/CP/PP over gloo), the parallel linears with sequence parallelism,
``TransformerBlock``/``TransformerLayer`` and the pipeline schedules run unchanged.
"""

import contextlib
import importlib

import torch

_CPU = torch.device("cpu")
_enabled = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _NullStream:
    """A CUDA stream stand-in: CPU work is synchronous, so waiting is a no-op."""

    def wait_stream(self, other) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CudaStandIn:
    """``torch.cuda`` as the patched modules see it; anything not listed is the real one."""

    # `device=torch.cuda.current_device()` in buffers; the real call raises without a driver.
    current_device = staticmethod(lambda: _CPU)
    # After batched P2P in the pipeline schedules; gloo work has been waited on already.
    synchronize = staticmethod(lambda *args, **kwargs: None)
    # The "default CUDA generator" of the RNG tracker becomes the CPU generator.
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    get_rng_state = staticmethod(lambda *args, **kwargs: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *args, **kwargs: torch.set_rng_state(state))
    # DDP's gradient-reduction streams and the optimizer's cache release.
    Stream = staticmethod(lambda *args, **kwargs: _NullStream())
    current_stream = staticmethod(lambda *args, **kwargs: _NullStream())
    stream = staticmethod(lambda *args, **kwargs: contextlib.nullcontext())
    empty_cache = staticmethod(lambda: None)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_FACTORIES = frozenset(
    [
        "empty",
        "zeros",
        "ones",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "as_tensor",
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
    ]
)


def _on_cpu(factory):
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return wrapper


class _TorchStandIn:
    """``torch`` as the patched modules see it."""

    cuda = _CudaStandIn()

    def __getattr__(self, name):
        obj = getattr(torch, name)
        return _on_cpu(obj) if name in _FACTORIES else obj


# Modules whose `torch` is replaced, and why.
_PATCHED_MODULES = (
    "megatron.core.tensor_parallel.random",  # RNG tracker: cuda manual_seed / rng state
    "megatron.core.tensor_parallel.layers",  # sequence-parallel backward buffers
    "megatron.core.tensor_parallel.mappings",  # sequence-parallel gather / reduce-scatter buffers
    "megatron.core.tensor_parallel.utils",  # distribute_saved_activations split/gather
    "megatron.core.utils",  # GlobalMemoryBuffer
    "megatron.core.pipeline_parallel.p2p_communication",  # receive buffers, synchronize
    "megatron.core.pipeline_parallel.schedules",  # token-count tensors on device="cuda"
    "megatron.core.transformer.utils",  # causal / sliding-window mask factories
    "megatron.core.transformer.dot_product_attention",  # softmax offset (non-vanilla softmax)
    "megatron.core.transformer.attention",  # KV-cache buffers of generation (inference_context)
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq moved to the device
    "megatron.core.distributed.param_and_grad_buffer",  # DDP's grad buffers, streams
    "megatron.core.distributed.distributed_data_parallel",  # communication stream
    "megatron.core.distributed.finalize_model_grads",  # token-count and norm tensors
    "megatron.core.optimizer.optimizer",  # found-inf / grad-norm tensors
    "megatron.core.optimizer.distrib_optimizer",  # gather buffers
    "megatron.core.optimizer.clip_grads",  # total-norm tensors
    "megatron.core.transformer.module",  # Float16Module
    "megatron.core.dist_checkpointing.exchange_utils",  # shard exchange buffers
    "megatron.core.dist_checkpointing.strategies.torch",  # load buffers
    "megatron.core.dist_checkpointing.strategies.fully_parallel",  # exchange buffers
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # preload synchronize
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save-plan tensors
)


def _cpu_rng_tracker(random_module):
    class CpuRNGStatesTracker(random_module.CudaRNGStatesTracker):
        """Named RNG states swapped in and out of the CPU generator.

        Only ``fork`` differs: the base one warns on every use that the CPU state changed inside
        the "GPU" context, which is always true once that generator is the CPU one.
        """

        @contextlib.contextmanager
        def fork(self, name=random_module._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


class _CpuParameter(torch.nn.Parameter):
    """A parameter whose ``type()`` names the CUDA tensor type of its dtype.

    megatron's optimizers accept parameters only after checking
    ``param.type() in ("torch.cuda.FloatTensor", ...)``; everything else is a plain parameter.
    """

    def type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return super().type().replace("torch.", "torch.cuda.", 1)
        return super().type(dtype, non_blocking, **kwargs)


def mark_cpu_parameters(module: torch.nn.Module) -> None:
    """Let megatron's optimizers take ``module``'s CPU parameters (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    for param in module.parameters():
        if type(param) is torch.nn.Parameter:
            param.__class__ = _CpuParameter


def _clip_grads_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assert."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def enable_cpu_compat() -> bool:
    """Apply the patches once; returns True when they are active (no CUDA), else False."""
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    stand_in = _TorchStandIn()
    for name in _PATCHED_MODULES:
        importlib.import_module(name).torch = stand_in
    importlib.import_module(
        "megatron.core.optimizer.optimizer"
    ).clip_grad_by_total_norm_fp32 = _clip_grads_by_total_norm
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    # These index torch.cuda.default_generators or queue a lazy CUDA call that never runs
    # without CUDA (the tracker would then leave the generator on its last seed).
    rnd._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    rnd.CudaRNGStatesTracker = _cpu_rng_tracker(rnd)
    if rnd._CUDA_RNG_STATE_TRACKER_INITIALIZED and not isinstance(
        rnd._CUDA_RNG_STATE_TRACKER, rnd.CudaRNGStatesTracker
    ):
        rnd.initialize_rng_tracker(force_reset=True)
    _enabled = True
    return True
