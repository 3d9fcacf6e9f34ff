"""OpenFlamingo- and mPLUG-Owl3-style models in every parallel layout.

The model under TP 2, PP 2 (megatron's 1F1B schedule) and CP 3 (a rank without images) gives the
single-process loss and every gradient; the trainer on the tiny configs gives the single-process
losses under TP 2, CP 2 and PP 2, and a CP 2 checkpoint resumes under TP 2 with the uninterrupted
losses; the planner counts their parameters exactly; config errors name the field.
"""

import pytest
import torch
import torch.distributed as dist
from train_harness import TINY, run_configs, small_run, train_losses

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.families import family
from lvx_megatron.training.layout_check import validate_layout
from lvx_megatron.training.memory import parameter_counts

CONFIGS = TINY.parent
ARCHITECTURES = {
    "openflamingo": CONFIGS / "tiny-openflamingo.yaml",
    "mplug_owl3": CONFIGS / "tiny-mplug-owl3.yaml",
}
# The model-level gradient check covers mllama too: trainer losses alone miss gradient-scale bugs
# (Adam is nearly blind to a constant factor).
MODEL_ARCHITECTURES = {"mllama": TINY, **ARCHITECTURES}

LAYOUTS = {
    "tp2": {"parallel.tensor_model_parallel_size": 2},
    "cp2": {"parallel.context_parallel_size": 2},
    "pp2": {"parallel.pipeline_model_parallel_size": 2},
}
TOLERANCE = 1e-5  # fp32; reduction orders differ between layouts
# Gates open from the start, so the first step already trains every cross-attention weight.
OPEN_GATES = {"model.cross_attention.gate_init": 0.5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run of each architecture, and each in every two-rank layout."""
    root = tmp_path_factory.mktemp("architectures")
    data = str(root / "data")
    spawn_gloo(
        1,
        run_configs,
        [(cfg, small_run(data, str(root / arch / "single"), **OPEN_GATES)) for arch, cfg in ARCHITECTURES.items()],
    )
    two_rank = []
    for arch, cfg in ARCHITECTURES.items():
        d = lambda name, arch=arch: str(root / arch / name)
        two_rank += [(cfg, small_run(data, d(name), **OPEN_GATES, **overrides)) for name, overrides in LAYOUTS.items()]
        stop = {"checkpoint.save": d("ckpt"), "training.exit_interval": 2}
        two_rank.append((cfg, small_run(data, d("stop"), **OPEN_GATES, **LAYOUTS["cp2"], **stop)))
        resume = {"checkpoint.load": d("ckpt")}
        two_rank.append((cfg, small_run(data, d("resume_tp2"), **OPEN_GATES, **LAYOUTS["tp2"], **resume)))
    spawn_gloo(2, run_configs, two_rank)
    return root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_layout_gives_the_single_process_losses(runs, arch, layout):
    reference = train_losses(runs / arch / "single")
    assert len(reference) == 4 and reference[-1] < reference[0]  # it trains
    losses = train_losses(runs / arch / layout)
    assert all(abs(x - y) <= TOLERANCE * abs(y) for x, y in zip(losses, reference, strict=True)), (losses, reference)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpoint_resumes_into_another_layout(runs, arch):
    resumed, uninterrupted = train_losses(runs / arch / "resume_tp2"), train_losses(runs / arch / "cp2")[2:]
    assert all(abs(x - y) <= TOLERANCE * abs(y) for x, y in zip(resumed, uninterrupted, strict=True))


def _batch(cfg) -> dict:
    """Two images in the first sample (at tokens 2 and 5), one in the second; a padding image slot;
    the inputs ``cfg``'s model family takes."""
    gen = torch.Generator().manual_seed(7)
    b, s, n = 2, 24, 2
    batch = dict(
        tokens=torch.randint(4, 29, (b, s), generator=gen),
        labels=torch.randint(4, 29, (b, s), generator=gen),
        pixel_values=torch.randn(b, n, 1, 3, 32, 32, generator=gen),
        aspect_ratio_ids=torch.ones(b, n, dtype=torch.long),
        aspect_ratio_mask=torch.ones(b, n, 1, dtype=torch.long),
        cross_attention_mask=torch.ones(b, s, n, 1, dtype=torch.long),
        image_positions=torch.tensor([[2, 5], [4, -1]]),
    )
    return {k: batch[k] for k in family(cfg).model_inputs}


def _pipeline_loss(model, batch: dict) -> torch.Tensor:
    """Forward and backward through megatron's 1F1B schedule (one micro-batch); the summed loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batch["tokens"].shape
    shape = model.pipeline_tensor_shape(s, b, batch["pixel_values"].shape[1], 1)

    def step(data_iterator, stage):
        def loss_func(output):
            loss = output[0].sum()
            return loss, torch.tensor(output[0].numel(), dtype=torch.int), {"loss": loss.detach()}

        return stage(**next(data_iterator)), loss_func

    reports = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
        adjust_tensor_shapes_fn=(
            (lambda recv, send: ([shape] * len(recv), [shape] * len(send)))
            if model.pg_collection.pp.size() > 1
            else None
        ),
    )
    return reports[0]["loss"] if reports else torch.zeros(())


def _loss_and_grads(config, overrides: dict) -> tuple[float, dict, int]:
    """The summed loss and every parameter's whole gradient by global name (as finalize_model_grads
    leaves them: sequence-parallel norms summed over TP), gathered over TP, CP and PP."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.tp_shards import unshard
    from lvx_megatron.models.weight_init import global_parameter_names
    from lvx_megatron.training.setup import build_model, init_model_parallel

    cfg = load_config(config, {**overrides, **OPEN_GATES})
    pg = init_model_parallel(cfg)
    _, model = build_model(cfg, vocab_size=29, pg=pg, device=torch.device("cpu"))
    with torch.no_grad():  # mllama's vision gates start closed (tanh(0)), hiding what they gate
        for name, p in model.named_parameters():
            if name.startswith("vision_model.") and name.rsplit(".", 1)[-1].startswith("gate"):
                p.fill_(0.5)
    total = _pipeline_loss(model, _batch(cfg))
    for group in (pg.cp, pg.pp):  # each CP rank holds its text rows' losses; the last stage holds them all
        dist.all_reduce(total, group=group)
    names, grads = global_parameter_names(model), {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=pg.cp)
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=pg.tp)
        glu = model.config.gated_linear_unit and ".gated_cross_attention." not in name
        grads[names[name]] = unshard(grad, p, name, glu, pg.tp)
    stages = [None] * pg.pp.size()
    dist.all_gather_object(stages, grads, group=pg.pp)
    count = sum(p.numel() for p in model.parameters())
    ps.destroy_model_parallel()
    return float(total), {k: g for stage in stages for k, g in stage.items()}, count


def model_layouts(rank: int, world_size: int, layouts: dict) -> dict:
    """Worker: per architecture, the single-process model (on every rank) and each layout."""
    from lvx_megatron.core.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    single = {"parallel.context_parallel_size": 1}
    return {
        arch: {name: _loss_and_grads(config, o) for name, o in {"single": single, **layouts}.items()}
        for arch, config in MODEL_ARCHITECTURES.items()
    }


MODEL_LAYOUTS = {
    3: {"cp3": {"parallel.context_parallel_size": 3}},  # 2 images: the third rank holds none
    2: {name: {"parallel.context_parallel_size": 1, **o} for name, o in LAYOUTS.items() if name != "cp2"},
}


@pytest.mark.parametrize("world_size", sorted(MODEL_LAYOUTS))
def test_model_layouts_give_the_single_process_loss_and_gradients(world_size):
    for arch, results in spawn_gloo(world_size, model_layouts, MODEL_LAYOUTS[world_size])[0].items():
        single_loss, single, count = results.pop("single")
        assert count == sum(parameter_counts(load_config(MODEL_ARCHITECTURES[arch]), vocab_size=29).values()), arch
        for layout, (loss, grads, _) in results.items():
            assert abs(loss - single_loss) <= 1e-5 * abs(single_loss), (arch, layout)
            assert grads.keys() == single.keys(), (arch, layout)
            for name, grad in single.items():
                assert grad.abs().sum() > 0, (arch, name)  # every weight is exercised
                assert (grads[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-7, (arch, layout, name)


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (TINY, {"model.architecture": "llava"}, "config error: model.architecture: Input should be 'mllama'"),
        (TINY, {"model.vision.feature_layer": -2}, "config error: model.vision.feature_layer: not used"),
        (ARCHITECTURES["mplug_owl3"], {"model.perceiver": {"depth": 2}}, "config error: model.perceiver: not used"),
        (ARCHITECTURES["openflamingo"], {"model.vision.max_num_tiles": 4}, "config error: model.vision.max_num_tiles"),
        (ARCHITECTURES["openflamingo"], {"model.text.cross_attention_layers": [1]}, "config error: model.text: give"),
    ],
)
def test_architecture_config_errors_name_the_field(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_layout_check_names_the_gated_blocks_heads():
    cfg = load_config(
        ARCHITECTURES["openflamingo"], {"parallel.tensor_model_parallel_size": 4, "parallel.context_parallel_size": 1}
    )
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size .*model.cross_attention.heads \(2\)"):
        validate_layout(cfg, 4)


def test_every_n_layers_gives_openflamingo_its_block_layers():
    nine_b = load_config(CONFIGS / "openflamingo-9b.yaml")
    assert nine_b.model.text.cross_attention_layers == [3, 7, 11, 15, 19, 23, 27, 31]
    assert load_config(CONFIGS / "openflamingo-3b.yaml").model.text.cross_attention_layers == list(range(24))


def plans_per_forward(rank: int, world_size: int) -> dict:
    """Worker: per architecture, how many mask plans one micro-batch's forward+backward builds, and
    whether every cross-attention call got the plan (the same object each time)."""
    from lvx_megatron.core import ContextParallelCrossAttention
    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.ops.mask_plan import MaskPlan
    from lvx_megatron.training.setup import build_model, init_model_parallel

    enable_cpu_compat()
    built, seen = [], []
    build, forward = MaskPlan.build.__func__, ContextParallelCrossAttention.forward

    def counting_build(cls, *args, **kwargs):
        built.append(build(cls, *args, **kwargs))
        return built[-1]

    def recording_forward(self, hidden_states, context, context_mask=None, **kwargs):
        seen.append(None if context_mask is None else context_mask.plan)
        return forward(self, hidden_states, context, context_mask, **kwargs)

    MaskPlan.build = classmethod(counting_build)
    ContextParallelCrossAttention.forward = recording_forward
    out = {}
    for arch, config in MODEL_ARCHITECTURES.items():
        built.clear()
        seen.clear()
        cfg = load_config(config, {"parallel.context_parallel_size": 1})
        pg = init_model_parallel(cfg)
        _, model = build_model(cfg, vocab_size=29, pg=pg, device=torch.device("cpu"))
        _pipeline_loss(model, _batch(cfg))
        out[arch] = (len(built), len(seen), all(plan is built[0] for plan in seen))
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    return out


def test_every_model_builds_one_mask_plan_per_micro_batch_for_all_its_layers():
    for arch, (plans, calls, same) in spawn_gloo(1, plans_per_forward)[0].items():
        assert plans == 1 and calls >= 2 and same, (arch, plans, calls, same)
