"""``training/flops.py`` against FLOPs counted while the tiny models of every architecture run.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul and convolution the model runs,
inside autograd Functions too (the distributed cross-attention's torch backend runs einsums). What
it cannot see, and how the test deals with it:

- SDPA's fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``, no formula
  registered): the models run under SDPA's math backend, whose matmuls it counts;
- the model-FLOPs conventions, counted independently from the config below: causal attention
  computes the whole square (model FLOPs: half), the cross-attention backward recomputes the
  scores ``Q K^T`` and the visual K/V projections (``recompute_visual_kv``), and the patch
  convolution has no input gradient (pixels need none).
"""

import pytest
import torch
from train_harness import TINY

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.config import RunConfig, load_config
from lvx_megatron.training.families import family
from lvx_megatron.training.flops import flops_per_sample, forward_flops_per_sample

CONFIGS = {
    "mllama": TINY,
    "openflamingo": TINY.parent / "tiny-openflamingo.yaml",
    "mplug_owl3": TINY.parent / "tiny-mplug-owl3.yaml",
}
# One process; the torch block backend, whose einsums the counter sees.
OVERRIDES = {"parallel.context_parallel_size": 1, "model.cross_attention.backend": "torch"}
BATCH = 2


def _count(arch: str) -> tuple[int, int, int]:
    """FLOPs counted in one forward and one backward of ``BATCH`` full samples; the padded vocabulary."""
    from megatron.core import parallel_state
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lvx_megatron.training.setup import build_model, init_model_parallel

    cfg = load_config(CONFIGS[arch], OVERRIDES)
    _, model = build_model(cfg, vocab_size=29, pg=init_model_parallel(cfg), device=torch.device("cpu"))
    d, v = cfg.data, cfg.model.vision
    n, tiles, gen = d.max_images, v.max_num_tiles, torch.Generator().manual_seed(0)
    batch = dict(
        tokens=torch.randint(4, 29, (BATCH, d.seq_length), generator=gen),
        labels=torch.randint(4, 29, (BATCH, d.seq_length), generator=gen),
        pixel_values=torch.randn(BATCH, n, tiles, 3, v.image_size, v.image_size, generator=gen),
        aspect_ratio_ids=torch.ones(BATCH, n, dtype=torch.long),
        aspect_ratio_mask=torch.ones(BATCH, n, tiles, dtype=torch.long),
        cross_attention_mask=torch.ones(BATCH, d.seq_length, n, tiles, dtype=torch.long),
        image_positions=torch.arange(n).expand(BATCH, n).contiguous(),  # every image slot holds an image
    )
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(**{k: batch[k] for k in family(cfg).model_inputs})
    with backward:
        loss.sum().backward()
    parallel_state.destroy_model_parallel()
    return forward.get_total_flops(), backward.get_total_flops(), model.text.padded_vocab_size


def _count_all(rank: int, world_size: int) -> dict[str, tuple[int, int, int]]:
    """Worker: :func:`_count` of every architecture."""
    from lvx_megatron.core.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    return {arch: _count(arch) for arch in CONFIGS}


@pytest.fixture(scope="module")
def counted() -> dict[str, tuple[int, int, int]]:
    return spawn_gloo(1, _count_all)[0]


def _unseen_terms(cfg: RunConfig) -> dict[str, int]:
    """Per sample, from the config alone: what the kernels compute beyond model FLOPs, and less."""
    m, t, v, d = cfg.model, cfg.model.text, cfg.model.vision, cfg.data
    s, h, patches = d.seq_length, t.hidden_size, (v.image_size // v.patch_size) ** 2
    cross = len(t.cross_attention_layers)
    kv_width = (t.num_query_groups or t.num_attention_heads) * (h // t.num_attention_heads)
    if m.architecture == "mllama":  # gated cross-attention layers have no self-attention
        self_layers, visual, q_width, kv_in = t.num_layers - cross, v.max_num_tiles * (patches + 1), h, h
    elif m.architecture == "openflamingo":  # blocks of their own width on the resampled latents
        x = m.cross_attention
        self_layers, visual, q_width, kv_in = t.num_layers, m.perceiver.num_latents, x.heads * x.head_dim, v.hidden_size
        kv_width = q_width
    else:  # hyper attention beside the self-attention
        self_layers, visual, q_width, kv_in = t.num_layers, patches, h, h
    visual *= d.max_images
    return {
        "causal_square": self_layers * 2 * s * s * h,  # the upper half of each 4 s^2 h attention
        "score_recompute": cross * 2 * s * visual * q_width,
        "kv_recompute": cross * 2 * visual * kv_in * 2 * kv_width,
        "patch_input_grad": d.max_images * v.max_num_tiles * patches * 2 * 3 * v.patch_size**2 * v.hidden_size,
    }


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_flops_match_the_counted_forward_and_backward(counted, arch):
    forward_total, backward_total, vocab = counted[arch]
    forward, backward = forward_total / BATCH, backward_total / BATCH
    cfg = load_config(CONFIGS[arch], OVERRIDES)
    model_forward = sum(forward_flops_per_sample(cfg, vocab).values())
    unseen = _unseen_terms(cfg)
    assert forward == model_forward + unseen["causal_square"], (forward, model_forward, unseen)
    model_backward = (
        backward - 2 * unseen["causal_square"] - unseen["score_recompute"] - unseen["kv_recompute"]
    ) + unseen["patch_input_grad"]
    assert model_backward == 2 * model_forward, (backward, model_forward, unseen)
    assert flops_per_sample(cfg, vocab) == 3 * model_forward  # nothing frozen: forward + backward
