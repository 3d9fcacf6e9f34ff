"""Hugging Face Llama-3.2-Vision checkpoints in and out of lvx-megatron, with logit parity.

A small random ``MllamaForConditionalGeneration`` (GQA, 2 cross-attention layers, 2 local + 1
global vision layers, images with 1, 2 and 4 of 4 tiles, a padding image, text before the first
image, right padding, non-zero gates, Llama-3 RoPE scaling) is saved with ``save_pretrained``,
imported with ``tools/convert_hf_checkpoint.py`` and run with ``tools/mllama_forward.py`` in
several (TP, CP, PP) layouts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_harness import HF_EOS, hf_prompts, ours_on_hf_checkpoint
from hf_harness import hf_logits, make_hf_checkpoint, make_inputs, our_runs

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.models import hf_mapping

ROOT = Path(__file__).resolve().parents[2]
CONVERT = ROOT / "tools" / "convert_hf_checkpoint.py"


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The HF directory, its imported checkpoint, the inputs and HF's own logits."""
    root = tmp_path_factory.mktemp("hf")
    make_hf_checkpoint(root / "hf")
    inputs = make_inputs()
    done = _convert("import", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"))
    assert done.returncode == 0, done.stderr
    assert "import: decoder layer 4 (cross-attention): 11 tensors" in done.stdout
    return dict(root=root, ckpt=root / "ckpt", inputs=inputs, reference=hf_logits(root / "hf", inputs))


GREEDY_STEPS = 3


@pytest.fixture(scope="module")
def ours(checkpoints) -> dict:
    """Our logits in every layout, greedy tokens (CP 3) and the train state's load (TP 2, bf16)."""
    ckpt, inputs = str(checkpoints["ckpt"]), checkpoints["inputs"]
    two = spawn_gloo(2, our_runs, ckpt, inputs, [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)], 0, True)[0]
    three = spawn_gloo(3, our_runs, ckpt, inputs, [(1, 3, 1)], GREEDY_STEPS, False)[0]
    return {"logits": two["logits"] | three["logits"], "greedy": three["greedy"], "train": two["train"]}


def _max_relative_error(ours: torch.Tensor, reference: torch.Tensor, real: torch.Tensor) -> float:
    """Worst ``max|ours - ref| / max|ref|`` over the positions of real tokens."""
    errors = (ours - reference).abs().amax(-1) / reference.abs().amax(-1)
    return float(errors[real].max())


def test_logits_match_hf_in_every_layout(checkpoints, ours):
    inputs, reference = checkpoints["inputs"], checkpoints["reference"]
    real = inputs["attention_mask"].bool()
    assert len(ours["logits"]) == 5
    for layout, logits in ours["logits"].items():
        assert logits.shape == reference.shape and logits.dtype == torch.float32, layout
        error = _max_relative_error(logits, reference, real)
        print(f"(TP, CP, PP) = {layout}: max relative error {error:.2e}")
        assert error < 1e-4, layout


def test_export_reproduces_hf_logits_exactly(checkpoints):
    out = checkpoints["root"] / "exported"
    done = _convert("export", "--load", str(checkpoints["ckpt"]), "--out", str(out), "--max-shard-size", "200KB")
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded files + index
    assert torch.equal(hf_logits(out, checkpoints["inputs"]), checkpoints["reference"])


def test_greedy_tokens_match_hf_generate(checkpoints, ours):
    from transformers import MllamaForConditionalGeneration

    sample = {k: v[:1] for k, v in checkpoints["inputs"].items()}
    model = MllamaForConditionalGeneration.from_pretrained(checkpoints["root"] / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(**sample, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False)
    assert ours["greedy"] == generated[0, sample["input_ids"].shape[1] :].tolist()


def test_kv_cached_generation_matches_hf_generate(checkpoints):
    """lvx_megatron.generation (KV cache, visual K/V cached per CP rank, CP 2) on four prompts: text
    before the first image, images of 2 and 4 tiles, a padding image slot, two seeds."""
    from transformers import MllamaForConditionalGeneration

    prompts, steps = hf_prompts(), 5
    ours = spawn_gloo(2, ours_on_hf_checkpoint, str(checkpoints["ckpt"]), prompts, steps)
    model = MllamaForConditionalGeneration.from_pretrained(checkpoints["root"] / "hf", dtype=torch.float32).eval()
    theirs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(**p, max_new_tokens=steps, do_sample=False, eos_token_id=HF_EOS, pad_token_id=3)
            theirs.append(out[0, p["input_ids"].shape[1] :].tolist())
    assert len({tuple(t) for t in theirs}) > 1  # the prompts get different answers
    assert ours[0] == ours[1] == theirs


def test_imported_run_config_and_errors(checkpoints, tmp_path, capsys):
    from lvx_megatron.training.config import load_config
    from tools.convert_hf_checkpoint import main as convert_main

    cfg = load_config(checkpoints["ckpt"] / "model.yaml")
    assert cfg.model.cross_attention.blind_rows == "attend_all"
    assert cfg.model.text.rope_scaling and cfg.model.text.cross_attention_layers == [1, 4]
    original = json.loads((checkpoints["root"] / "hf" / "config.json").read_text())
    section = hf_mapping.model_section_from_hf(original)
    section["text"]["hidden_size"] = 128
    with pytest.raises(ValueError, match=r"model\.text\.hidden_size"):
        hf_mapping.hf_config_from_model(section, 100, original)
    config = json.loads(json.dumps(original))
    config["text_config"]["rope_parameters"]["low_freq_factor"] = 2.0
    with pytest.raises(ValueError, match=r"text_config\.rope_scaling\.low_freq_factor"):
        hf_mapping.model_section_from_hf(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert convert_main(["import", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "ckpt")]) == 2
    assert "error: config.json: text_config.rope_scaling.low_freq_factor" in capsys.readouterr().err


def test_layouts_round_trip_and_vocab_padding():
    dims = hf_mapping.TextDims(num_heads=8, num_groups=2, head_dim=3, vocab_size=10, padded_vocab_size=32)
    hf = [torch.randn(24, 5), torch.randn(6, 5), torch.randn(6, 5)]
    qkv = hf_mapping.TensorMap("x", ("q", "k", "v"), "qkv", "g")
    ours = hf_mapping.to_ours(qkv, hf, dims)
    assert torch.equal(ours[:12], hf[0][:12]) and torch.equal(ours[12:15], hf[1][:3])  # group 0: 4 q heads, k, v
    assert all(torch.equal(a, b) for a, b in zip(hf_mapping.to_hf(qkv, ours, dims), hf, strict=True))
    embedding = hf_mapping.TensorMap("e", ("e",), "embedding", "g")
    padded = hf_mapping.to_ours(embedding, [torch.randn(18, 5)], dims)
    assert padded.shape == (32, 5) and padded[18:].abs().sum() == 0
    assert hf_mapping.vocab_multiple(128256) == 128 and hf_mapping.vocab_multiple(127) == 256


def test_training_starts_from_the_imported_checkpoint(checkpoints, ours):
    from safetensors import safe_open

    iteration, embedding, gap = ours["train"]
    with safe_open(str(checkpoints["root"] / "hf" / "model.safetensors"), framework="pt") as f:
        hf = f.get_tensor("language_model.model.embed_tokens.weight")
    assert iteration == 0
    assert torch.equal(embedding[: hf.shape[0]], hf.to(torch.bfloat16).float())
    assert embedding[hf.shape[0] :].abs().sum() == 0
    assert gap == 0.0  # the optimizer's fp32 main parameters were refreshed from the loaded weights
