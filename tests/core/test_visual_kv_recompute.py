"""With recompute on, cross-attention layers keep no per-layer visual K/V for backward."""

from block_harness import frozen_visual_side, saved_tensor_bytes

from lvx_megatron.launch import spawn_gloo

VISUAL = 8192


def _measure(layers: int, recompute: bool) -> dict:
    return spawn_gloo(1, saved_tensor_bytes, layers, recompute, VISUAL)[0]


def test_recompute_keeps_no_visual_kv_and_memory_does_not_grow_with_layers():
    on2, on4 = _measure(2, True), _measure(4, True)
    off2, off4 = _measure(2, False), _measure(4, False)
    for r in (on2, on4, off2, off4):
        assert r["grads_finite"] and r["x_grad_norm"] > 0
    assert not on2["saves_layer_kv"] and not on4["saves_layer_kv"]
    assert off2["saves_layer_kv"] and off4["saves_layer_kv"]
    kv = on2["kv_bytes"]
    # Each extra layer adds only text-side activations: under 5% of one layer's K/V.
    assert (on4["saved_bytes"] - on2["saved_bytes"]) / 2 < 0.05 * kv
    # Without recompute each extra layer keeps (at least) its K/V.
    assert (off4["saved_bytes"] - off2["saved_bytes"]) / 2 >= kv


def test_recompute_with_frozen_visual_side_still_trains_the_text_side():
    grads = spawn_gloo(1, frozen_visual_side)[0]
    assert grads["layers.1.cross_attention.linear_q.weight"] and grads["layers.1.cross_attention.q_norm.weight"]
    assert not grads["layers.1.cross_attention.linear_kv.weight"]
