"""MllamaModel under context parallelism equals the one-rank model, including ranks without images."""

import pytest
import torch
import torch.distributed as dist
from train_harness import TINY

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.models.sharding import image_range, text_range
from lvx_megatron.training.config import load_config
from lvx_megatron.training.memory import parameter_counts


def _batch(num_images: int, seq: int = 24, tiles: int = 1, tile: int = 32, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(7)
    xmask = torch.zeros(batch, seq, num_images, tiles, dtype=torch.long)
    xmask[:, 3:, :, :] = 1  # the first tokens precede every image
    xmask[1, 3:, 0] = 0  # the second sample's text sees only the later images
    return dict(
        tokens=torch.randint(4, 29, (batch, seq), generator=gen),
        labels=torch.randint(4, 29, (batch, seq), generator=gen),
        pixel_values=torch.randn(batch, num_images, tiles, 3, tile, tile, generator=gen),
        aspect_ratio_ids=torch.ones(batch, num_images, dtype=torch.long),
        aspect_ratio_mask=torch.ones(batch, num_images, tiles, dtype=torch.long),
        cross_attention_mask=xmask,
    )


def _loss_and_grads(cp: int, num_images: int) -> tuple[float, dict, int]:
    from megatron.core import parallel_state as ps

    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.setup import build_model, init_model_parallel

    cfg = load_config(TINY, {"parallel.context_parallel_size": cp, "model.cross_attention.gate_init": 0.5})
    pg = init_model_parallel(cfg)
    _, model = build_model(cfg, vocab_size=29, pg=pg, device=torch.device("cpu"))
    loss, correct = model(**_batch(num_images))
    assert correct.dtype == torch.bool and loss.shape == correct.shape
    total = loss.sum()
    total.backward()
    if cp > 1:  # each CP rank holds its text rows' losses and partial gradients
        dist.all_reduce(total := total.detach().clone(), group=pg.cp)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=pg.cp)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ps.destroy_model_parallel()
    return float(total), grads, sum(p.numel() for p in model.parameters())


def model_layouts(rank: int, world_size: int, num_images: int) -> dict:
    """Worker: the CP=1 model on every rank, then the CP=world model."""
    from lvx_megatron.core.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    return {"single": _loss_and_grads(1, num_images), "cp": _loss_and_grads(world_size, num_images)}


@pytest.mark.parametrize("world_size, num_images", [(3, 2), (2, 5)])
def test_context_parallel_model_matches_one_rank(world_size, num_images):
    (single_loss, single, count), (cp_loss, cp, _) = spawn_gloo(world_size, model_layouts, num_images)[0].values()
    assert count == sum(parameter_counts(load_config(TINY), vocab_size=29).values())  # the planner's count
    assert abs(cp_loss - single_loss) <= 1e-5 * abs(single_loss)
    for name, grad in single.items():
        assert torch.isfinite(cp[name]).all()
        assert (cp[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-7, name
    assert any(n.startswith("vision_model.") and g.abs().sum() > 0 for n, g in cp.items())


def test_images_and_text_split_in_whole_pieces():
    assert [image_range(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]  # the last rank: none
    assert [image_range(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [text_range(24, 3, r) for r in range(3)] == [(0, 8), (8, 16), (16, 24)]
    with pytest.raises(ValueError, match="seq_length"):
        text_range(25, 3, 0)
