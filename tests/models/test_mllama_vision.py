"""The mllama vision encoder and projector against transformers' MllamaVisionModel (SDPA attention)."""

import pytest
import torch

from lvx_megatron.models import MllamaVisionEncoder, MultiModalProjector, VisionEncoderConfig

pytest.importorskip("transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaVisionConfig, MllamaVisionModel

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# A small encoder: 3 local layers (the outputs of 0 and 2 kept) and 2 global ones, on up to 4 tiles.
WIDTHS = dict(hidden_size=32, attention_heads=4, intermediate_size=64)
DEPTHS = dict(num_hidden_layers=3, num_global_layers=2, intermediate_layers_indices=[0, 2])
TILES = dict(image_size=28, patch_size=7, max_num_tiles=4)
SMALL = WIDTHS | DEPTHS | TILES


def hf_vision_config() -> MllamaVisionConfig:
    # Eager attention takes the softmax in float32 even for float64 inputs; SDPA computes in the input dtype.
    return MllamaVisionConfig(**SMALL, vision_output_dim=96, attn_implementation="sdpa")


def randomized_pair(dtype: torch.dtype, device: str) -> tuple[MllamaVisionModel, MllamaVisionEncoder]:
    """An HF model with every parameter random (gates included) and ours loaded from its state dict."""
    gen = torch.Generator().manual_seed(0)
    hf = MllamaVisionModel(hf_vision_config()).to(torch.float64)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name:  # away from 0 so both sides of every tanh mix count
                p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(0.3, 1.2, generator=gen))
            elif "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    hf = hf.to(device, dtype).eval()
    ours = MllamaVisionEncoder(VisionEncoderConfig.from_hf(hf.config)).to(device, dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def inputs(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=2 lists of 3 images: 1x1, 2x2, 1x3, 4x1 grids, a processor-style padding image (id 0, first tile on)
    and an image with every tile padded; padded tiles hold random pixels since real tokens attend to them."""
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 4, 3, 28, 28, generator=gen, dtype=torch.float64).to(device, dtype)
    aspect_ratio_ids = torch.tensor([[1, 6, 0], [3, 8, 0]], device=device)
    aspect_ratio_mask = torch.tensor(
        [[[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]], device=device
    )
    return pixel_values, aspect_ratio_ids, aspect_ratio_mask


def test_state_dict_names_and_shapes_match_hf():
    hf = MllamaVisionModel(hf_vision_config())
    ours = MllamaVisionEncoder(VisionEncoderConfig.from_hf(hf.config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_projector_names_match_hf():
    text = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    text.update(
        intermediate_size=64, vocab_size=64, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    hf = MllamaForConditionalGeneration(MllamaConfig(vision_config=hf_vision_config().to_dict(), text_config=text))
    prefix = "model.multi_modal_projector."
    hf_proj = {k.removeprefix(prefix): v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    proj = MultiModalProjector(96, 48)
    assert {k: v.shape for k, v in proj.state_dict().items()} == {k: v.shape for k, v in hf_proj.items()}
    proj.load_state_dict(hf_proj, strict=True)
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(proj(x), hf.model.multi_modal_projector(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_hf_float64(device):
    hf, ours = randomized_pair(torch.float64, device)
    args = inputs(torch.float64, device)
    with torch.no_grad():
        expected = hf(*args).last_hidden_state
        got = ours(*args)
    assert got.shape == expected.shape == (2, 3, 4, 17, 96)
    assert (got - expected).abs().max().item() < 1e-10
    # encode_images treats the images independently: any split of the flat list gives the same features.
    flat = [a.flatten(0, 1) for a in args]
    with torch.no_grad():
        parts = [ours.encode_images(*(a[i : i + 2] for a in flat)) for i in (0, 2, 4)]
    torch.testing.assert_close(torch.cat(parts), got.flatten(0, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_low_precision_matches_hf(device, dtype):
    hf, ours = randomized_pair(dtype, device)
    args = inputs(dtype, device)
    with torch.no_grad():
        expected = hf(*args).last_hidden_state
        got = ours(*args)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_gradients_match_hf_float32():
    hf, ours = randomized_pair(torch.float32, "cpu")
    pixel_values, ids, mask = inputs(torch.float32, "cpu")
    weight = torch.randn(2, 3, 4, 17, 96, generator=torch.Generator().manual_seed(2))
    (hf(pixel_values, ids, mask).last_hidden_state * weight).sum().backward()
    (ours(pixel_values, ids, mask) * weight).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        assert ref.abs().max() > 0, name
        assert (p.grad - ref).norm() <= 1e-5 * ref.norm(), name


def test_activation_checkpointing_same_output_and_grads():
    _, plain = randomized_pair(torch.float64, "cpu")
    _, ckpt = randomized_pair(torch.float64, "cpu")
    ckpt.activation_checkpointing = True
    pixel_values, ids, mask = inputs(torch.float64, "cpu")
    outs = []
    for model in (plain, ckpt):
        x = pixel_values.clone().requires_grad_()
        out = model(x, ids, mask)
        out.square().sum().backward()
        outs.append((out, x.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero_images(device, checkpointing):
    encoder = MllamaVisionEncoder(VisionEncoderConfig(**SMALL), activation_checkpointing=checkpointing).to(device)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    out = encoder.encode_images(torch.zeros(0, 4, 3, 28, 28, device=device), ids, ids.view(0, 1).expand(0, 4))
    assert out.shape == (0, 4, 17, 96)
    # Still part of the graph: a rank without images yields (zero) gradients for every parameter.
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in encoder.parameters())
    batched = encoder(torch.zeros(2, 0, 4, 3, 28, 28, device=device), ids.view(2, 0), ids.view(2, 0, 4))
    assert batched.shape == (2, 0, 4, 17, 96)


def test_wrong_input_shapes_raise():
    encoder = MllamaVisionEncoder(VisionEncoderConfig(**SMALL))
    with pytest.raises(ValueError, match="pixel_values"):
        encoder(torch.zeros(1, 1, 3, 3, 28, 28), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="aspect_ratio_mask"):
        encoder(torch.zeros(1, 1, 4, 3, 28, 28), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 3))


def test_config_properties_and_hf_round_trip():
    default = VisionEncoderConfig.from_hf(MllamaVisionConfig(image_size=560))  # Llama-3.2-11B-Vision geometry
    assert (default.num_patches, default.vision_output_dim, default.max_aspect_ratio_id) == (1600, 7680, 8)
    config = VisionEncoderConfig(**SMALL)
    assert VisionEncoderConfig.from_hf(MllamaVisionConfig(**config.to_hf_dict())) == config
    assert VisionEncoderConfig.from_hf(hf_vision_config().to_dict()) == config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 30),
        ("attention_heads", 5),
        ("intermediate_layers_indices", [0, 3]),
        ("intermediate_layers_indices", []),
        ("num_global_layers", -1),
        ("hidden_size", 0),
        ("norm_eps", 0.0),
        ("supported_aspect_ratios", [[1, 1], [3, 2]]),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VisionEncoderConfig(**{**SMALL, field: value})


@pytest.mark.parametrize(("field", "value"), [("vision_output_dim", 128), ("hidden_act", "silu")])
def test_from_hf_rejects_what_it_cannot_express(field, value):
    with pytest.raises(ValueError, match=field):
        VisionEncoderConfig.from_hf({**hf_vision_config().to_dict(), field: value})
