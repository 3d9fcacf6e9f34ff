"""Minimal CPU/gloo compatibility layer for megatron-core 0.19.2 (no CUDA at all).

enable_cpu_compat() is idempotent and a no-op when torch.cuda.is_available() is True.
Strategy: instead of patching torch globally, the few megatron modules that call
torch.cuda.* / build tensors with device="cuda" get their module-global `torch`
replaced by a thin proxy (_TorchShim) that forwards everything to the real torch
except (a) `torch.cuda.<a few fns>` and (b) tensor factories given a cuda device.
"""

import contextlib
import importlib

import torch

_ENABLED = False
_CPU = torch.device("cpu")


def _is_cuda_dev(d):
    if isinstance(d, int):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


class _CudaShim:
    """Stand-in for `torch.cuda` as seen by the shimmed megatron modules."""

    # device=torch.cuda.current_device() tensor factories -> CPU (the real one raises w/o GPU)
    current_device = staticmethod(lambda: _CPU)
    # p2p_communication.py / parallel_state.py call it after comms; gloo ops are synchronous
    synchronize = staticmethod(lambda *a, **k: None)
    # tensor_parallel/random.py: the "default CUDA generator" becomes the CPU default generator
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda s, *a, **k: torch.set_rng_state(s))

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


def _cpu_factory(fn):
    def wrapper(*args, **kwargs):
        if _is_cuda_dev(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


class _TorchShim:
    """Stand-in for the `torch` module inside selected megatron modules."""

    cuda = _CudaShim()

    def __getattr__(self, name):
        obj = getattr(torch, name)
        # schedules.py builds `torch.zeros([], ..., device="cuda")` (literal) for token counts
        return _cpu_factory(obj) if name in _FACTORIES else obj


# Modules whose `torch` global gets the shim (see report for the exact call sites).
_SHIMMED_MODULES = (
    "megatron.core.tensor_parallel.random",  # torch.cuda.manual_seed/get_rng_state in tracker
    "megatron.core.tensor_parallel.layers",  # SP backward: torch.empty(device=current_device())
    "megatron.core.tensor_parallel.mappings",  # SP gather/reduce-scatter output buffers
    "megatron.core.tensor_parallel.utils",  # split/gather_split_1d_tensor buffers
    "megatron.core.utils",  # GlobalMemoryBuffer.get_tensor (SP all-gather buffer)
    "megatron.core.pipeline_parallel.p2p_communication",  # recv buffers + synchronize
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens device="cuda"
    "megatron.core.transformer.utils",  # get_default_causal_mask: torch.ones(device="cuda")
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
)


def _make_cpu_tracker(random_mod):
    base = random_mod.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """CudaRNGStatesTracker whose named states live in the CPU default generator.

        fork() is overridden only because the base one warns 'CPU RNG state changed
        within GPU RNG context' on every use once the 'GPU' generator *is* the CPU one."""

        @contextlib.contextmanager
        def fork(self, name=random_mod._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable_cpu_compat():
    """Apply all patches (idempotent). Returns True if patches are active."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    shim = _TorchShim()
    for name in _SHIMMED_MODULES:
        importlib.import_module(name).torch = shim

    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    # _get/_set_cuda_rng_state index torch.cuda.default_generators / use _lazy_call (which
    # silently queues forever w/o CUDA); used by tracker.add/fork and CheckpointFunction.
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # initialize_rng_tracker() instantiates the module-global CudaRNGStatesTracker.
    random_mod.CudaRNGStatesTracker = _make_cpu_tracker(random_mod)
    if random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED and not isinstance(
        random_mod._CUDA_RNG_STATE_TRACKER, random_mod.CudaRNGStatesTracker
    ):
        random_mod.initialize_rng_tracker(force_reset=True)
    _ENABLED = True
    return True
