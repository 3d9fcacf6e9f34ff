"""Data pipeline: synthetic video QA, tokenizers, Mllama tiling/masks vs HF, collate, shards, sampler, tools."""

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.models.mllama import image_processing_pil_mllama as hf_pil
from transformers.models.mllama import processing_mllama as hf_proc

from lvx_megatron.data import (
    ByteTokenizer,
    ShardedVideoDataset,
    VideoQAGenerator,
    WordTokenizer,
    answer_accuracy,
    build_tokenizer,
    chance_accuracy,
    collate,
    cross_attention_token_mask,
    micro_batches,
    shards,
    supported_aspect_ratios,
    tile_image,
    write_shards,
)
from lvx_megatron.data.tiling import IMAGE_MEAN, IMAGE_STD, optimal_canvas
from lvx_megatron.data.video_qa import (
    COLORS,
    COUNTS,
    QUESTION_TYPES,
    chance_by_type,
)
from tools import folder_to_wds, make_video_qa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gen(n=40, split="train", seed=0, frames=6, size=32):
    return VideoQAGenerator(n, num_frames=frames, frame_size=size, seed=seed, split=split)


# --- synthetic video QA ------------------------------------------------------------------------------------
def test_generator_deterministic_and_splits_disjoint():
    a, b = _gen(), _gen()
    for i in (0, 7, 39):
        sa, sb = a[i], b[i]
        assert sa["frames"].dtype == np.uint8 and sa["frames"].shape == (6, 32, 32, 3)
        assert np.array_equal(sa["frames"], sb["frames"]) and sa["question"] == sb["question"]
        assert sa["answer"] == sb["answer"]
    ev = _gen(split="eval")
    train_clips = {a[i]["frames"].tobytes() for i in range(40)}
    assert not any(ev[i]["frames"].tobytes() in train_clips for i in range(40))
    assert not np.array_equal(_gen(seed=1)[0]["frames"], a[0]["frames"])


def test_answers_balanced_and_chance_accuracy():
    g = _gen(3000)
    plans = [g.plan(i) for i in range(3000)]  # no rendering: fast
    by_type = Counter(p.qtype for p in plans)
    total_w = sum(w for w, _, _ in QUESTION_TYPES.values())
    empirical_chance = 0.0
    for qtype, (w, answers, _) in QUESTION_TYPES.items():
        assert abs(by_type[qtype] / 3000 - w / total_w) < 0.03, (qtype, by_type)
        counts = Counter(p.answer for p in plans if p.qtype == qtype)
        assert set(counts) == set(answers)
        for a in answers:  # uniform within the type
            assert abs(counts[a] / by_type[qtype] - 1 / len(answers)) < 0.06, (qtype, counts)
        assert chance_by_type()[qtype] == pytest.approx(1 / len(answers))
        # The best frame-blind guess per type: its most frequent answer.
        empirical_chance += counts.most_common(1)[0][1] / 3000
    assert chance_accuracy() == pytest.approx((1 / 4 + 1 / 5 + 1 / 2) / 3)
    assert abs(empirical_chance - chance_accuracy()) < 0.03
    # Questions carry no hint: a question text occurs with every answer of its type.
    q_answers: dict[str, Counter] = {}
    for p in plans:
        q_answers.setdefault(p.question, Counter())[p.answer] += 1
    assert set(q_answers["which colour is in the most frames?"]) == set(COLORS)
    frequent = [(q, a) for q, a in q_answers.items() if sum(a.values()) >= 20 and not q.startswith("which")]
    assert len(frequent) >= 15
    for q, answers in frequent:
        assert set(answers) == set(COUNTS if q.startswith("in how") else ("yes", "no")), (q, answers)


def _colours_in(frame):
    """Colours (names) that appear in one uint8 [P, P, 3] frame."""
    return {c for c, rgb in COLORS.items() if np.all(frame == np.array(rgb, dtype=np.uint8), axis=-1).any()}


def _asked_colour(question):
    return next(w for w in question.replace("?", " ").split() if w in COLORS)


def _shown(frames, color):
    """Frames (indices) in which ``color`` appears."""
    return {t for t, f in enumerate(frames) if color in _colours_in(f)}


@pytest.mark.parametrize("num_frames", [8, 4, 6])
def test_answers_need_the_set_of_frames_not_their_order(num_frames):
    """Each answer is recomputable from the frames in any order: the count of frames showing the
    target, the colour shown in the most frames (by a quarter of them), whether the colour asked about
    is in any frame."""
    g = _gen(240, frames=num_frames, size=32)
    rng = np.random.default_rng(0)
    checked = Counter()
    for i in range(240):
        plan = g.plan(i)
        frames = g.render(plan)[rng.permutation(num_frames)]  # order never matters
        words = plan.question.split()
        if plan.qtype == "count":
            assert len(_shown(frames, words[6])) == g.count_frames(plan.answer)
        else:
            shown = {tr.color: len(_shown(frames, tr.color)) for tr in plan.tracks}
            gap = max(1, num_frames // 4)
            if plan.qtype == "most":
                ranked = sorted(shown.values())
                assert max(shown, key=shown.get) == plan.answer and ranked[-1] - ranked[-2] >= gap
            else:
                assert shown.get(_asked_colour(plan.question), 0) == (1 if plan.answer == "yes" else 0)
            assert len(shown) == 3 and min(shown.values()) >= 1  # three objects either way
        checked[plan.qtype] += 1
    assert min(checked.values()) > 50, checked


def test_counts_are_distinct_for_every_frame_count():
    for frames in (4, 5, 6, 8, 32):
        counts = [VideoQAGenerator(1, num_frames=frames).count_frames(a) for a in COUNTS]
        assert counts == sorted(set(counts)) and counts[-1] == frames, (frames, counts)


def _one_frame_guesses(frames: int, qtype: str, guess) -> list[bool]:
    """For each ``qtype`` sample of 3000: is ``guess(plan, frame, rng)``, an answer from one random frame, right?"""
    g = _gen(3000, frames=frames, size=32)
    rng = np.random.default_rng(1)
    right = []
    for i in range(3000):
        plan = g.plan(i)
        if plan.qtype == qtype:
            right.append(guess(plan, int(rng.integers(frames)), rng) == plan.answer)
    return right


def test_one_frame_does_not_tell_which_colour_is_in_the_most_frames():
    """The best one-frame answer to ``most`` (one of the colours that frame shows, at random) is right
    far less often than all frames are (always)."""

    def one_of_its_colours(plan, t, rng):
        in_frame = [tr.color for tr in plan.tracks if t in tr.shown]
        return str(rng.choice(in_frame)) if in_frame else None

    right = _one_frame_guesses(8, "most", one_of_its_colours)
    assert len(right) > 800 and np.mean(right) < 0.6, np.mean(right)


def test_one_frame_does_not_tell_whether_a_colour_is_seen():
    """The best one-frame answer to ``seen`` ("yes" if that frame shows the colour) is right for every
    "no" but only for 1 in F of the "yes" samples: 0.5 + 0.5 / F, far below what all frames give (1.0)."""

    def shown_in_it(plan, t, rng):
        asked = _asked_colour(plan.question)
        return "yes" if any(tr.color == asked and t in tr.shown for tr in plan.tracks) else "no"

    right = _one_frame_guesses(4, "seen", shown_in_it)
    assert len(right) > 800 and abs(np.mean(right) - (0.5 + 0.5 / 4)) < 0.05, np.mean(right)


def test_generator_errors_name_field():
    with pytest.raises(ValueError, match="split"):
        VideoQAGenerator(4, split="test")
    with pytest.raises(ValueError, match="num_frames"):
        VideoQAGenerator(4, num_frames=3)


# --- tokenizers ----------------------------------------------------------------------------------------------
def test_word_tokenizer_roundtrip_and_oov():
    tok = build_tokenizer("words")
    assert isinstance(tok, WordTokenizer)
    g = _gen(60)
    for i in range(60):
        p = g.plan(i)
        for text in (p.question, p.answer):
            ids = tok.encode(text)
            assert all(0 <= t < tok.vocab_size for t in ids) and tok.decode(ids) == text
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id}) == 4
    assert tok.encode("<|image|>which") == [tok.image_id, tok.stoi["which"]]
    with pytest.raises(ValueError, match="'purple'"):
        tok.encode("in how many frames is the purple square?")


def test_byte_tokenizer_roundtrip():
    tok = build_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 260
    text = "Wer fährt? 東京 🚗 <|image|> end"
    ids = tok.encode(text)
    assert ids.count(tok.image_id) == 1 and tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"words.*bytes.*huggingface"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="path"):
        build_tokenizer("huggingface")


def test_huggingface_tokenizer_local(tmp_path):
    def save(words, folder):
        vocab = {w: i for i, w in enumerate(words)}
        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.add_special_tokens({"additional_special_tokens": [w for w in words if w == "<|image|>"]})
        fast.save_pretrained(folder)

    save(["<unk>", "<s>", "</s>", "<|image|>", "hello", "world"], tmp_path / "ok")
    tok = build_tokenizer("huggingface", str(tmp_path / "ok"))
    assert (tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id) == (1, 2, 3, 2)  # no pad token: eos
    assert tok.encode("<|image|>hello world") == [3, 4, 5]
    save(["<unk>", "<s>", "</s>", "hello"], tmp_path / "noimg")
    with pytest.raises(ValueError, match=r"<\|image\|>"):
        build_tokenizer("huggingface", str(tmp_path / "noimg"))


# --- tiling and masks vs Hugging Face --------------------------------------------------------------------------
def _hf_image_module():
    """HF's Mllama image helpers: the torchvision module if importable, else its PIL twin (same functions;
    torchvision is no dependency)."""
    try:  # the torchvision module raises only on first use when torchvision is missing
        from transformers.models.mllama import image_processing_mllama as mod

        mod.get_all_supported_aspect_ratios(1)
    except ImportError:
        mod = hf_pil
    return mod


def test_aspect_ratios_and_canvas_match_hf():
    hf_img = _hf_image_module()
    for max_tiles in (1, 2, 4, 6, 8):
        assert supported_aspect_ratios(max_tiles) == hf_img.get_all_supported_aspect_ratios(max_tiles)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(5, 400, size=(150, 2))] + [(224, 224), (448, 224), (100, 100)]
    for h, w in sizes:
        for max_tiles, tile in ((4, 56), (4, 224), (6, 32)):
            assert optimal_canvas(h, w, max_tiles, tile) == tuple(
                int(x) for x in hf_img.get_optimal_tiled_canvas(h, w, max_tiles, tile)
            ), (h, w, max_tiles, tile)


def test_tile_image_matches_hf_processor():
    proc = hf_pil.MllamaImageProcessorPil(
        size={"height": 16, "width": 16}, max_image_tiles=4, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)
    )
    rng = np.random.default_rng(1)
    for h, w in ((20, 50), (40, 12), (16, 16), (30, 30), (64, 64)):
        # Smooth image so resampling differences between PIL and torch stay small.
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, int(rng.integers(256)))], -1).astype(
            np.uint8
        )
        tiles, ar_id = tile_image(img, tile_size=16, max_num_tiles=4)
        ref = proc([[img]], return_tensors="np")
        assert ar_id == int(ref["aspect_ratio_ids"][0, 0]), (h, w)
        assert tiles.shape[0] == ref["num_tiles"][0][0]
        ref_tiles = torch.from_numpy(ref["pixel_values"][0, 0, : tiles.shape[0]])
        assert tiles.dtype == torch.float32 and tiles.shape[1:] == (3, 16, 16)
        assert (tiles - ref_tiles).abs().mean() < 0.1, (h, w)  # layout identical, pixels close


def test_wide_image_tile_layout():
    # 1 row x 3 columns: the tiles are the left, middle and right thirds of the image.
    img = np.zeros((16, 48, 3), np.uint8)
    img[:, 16:32] = 255
    tiles, ar_id = tile_image(img, tile_size=16, max_num_tiles=4)
    assert supported_aspect_ratios(4)[ar_id - 1] == (1, 3)
    assert tiles.shape == (3, 3, 16, 16)
    assert tiles[0].mean() < 0 < tiles[1].mean() and tiles[2].mean() < 0


def test_cross_attention_mask_matches_hf():
    img = 9
    cases = [
        [9, 1, 5, 6],
        [9, 9, 9, 1, 5, 6, 7],
        [1, 9, 5, 9, 6, 7],
        [9, 9, 1, 5, 9, 6, 9, 9, 7, 8],
        [1, 5, 6],
        [5, 9],
    ]
    for ids in cases:
        ranges = hf_proc.get_cross_attention_token_mask(ids, img)
        n = max(1, len(ranges))
        num_tiles = [[3] * len(ranges)]
        for length in (len(ids), len(ids) + 4):
            ref = hf_proc.convert_sparse_cross_attention_mask_to_dense([ranges], num_tiles, 4, length)[0]
            tile_mask = torch.zeros(n, 4, dtype=torch.int64)
            tile_mask[: len(ranges), :3] = 1
            ours = cross_attention_token_mask(ids, img, tile_mask=tile_mask, length=length)
            assert np.array_equal(ours.numpy()[:, : len(ranges)], ref), ids
        assert cross_attention_token_mask(ids, img).shape == (len(ids), len(ranges))


# --- collate --------------------------------------------------------------------------------------------------
def test_collate_contract():
    tok = WordTokenizer()
    g = _gen(3, frames=4, size=32)
    samples = [g[0], g[1], {**g[2], "frames": g[2]["frames"][:2]}]  # third sample: 2 frames only
    b = collate(samples, tok, seq_length=24, max_images=5, max_num_tiles=4, tile_size=16)
    B, S, N, T = 3, 24, 5, 4
    expect = {
        "tokens": ((B, S), torch.int64),
        "labels": ((B, S), torch.int64),
        "loss_mask": ((B, S), torch.float32),
        "pixel_values": ((B, N, T, 3, 16, 16), torch.float32),
        "aspect_ratio_ids": ((B, N), torch.int64),
        "aspect_ratio_mask": ((B, N, T), torch.int64),
        "cross_attention_mask": ((B, S, N, T), torch.int64),
        "image_positions": ((B, N), torch.int64),
        "question_type": ((B,), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in b.items()} == expect
    assert b["question_type"].tolist() == [-1] * B  # no question_types given
    labelled = [{**s, "qtype": t} for s, t in zip(samples, ("seen", "count", "unlisted"), strict=True)]
    typed = collate(labelled, tok, 24, 5, 4, 16, question_types=("count", "seen"))
    assert typed["question_type"].tolist() == [1, 0, -1]
    for i, s in enumerate(samples):
        f = len(s["frames"])
        q, a = tok.encode(s["question"]), tok.encode(s["answer"])
        ids = [tok.image_id] * f + [tok.bos_id, *q, *a, tok.eos_id]
        n = len(ids)
        assert b["tokens"][i, :n].tolist() == ids and (b["tokens"][i, n:] == tok.pad_id).all()
        assert b["labels"][i, : n - 1].tolist() == ids[1:] and (b["labels"][i, n - 1 :] == 0).all()
        targets = [t for t in range(S) if b["loss_mask"][i, t] == 1]
        assert [b["labels"][i, t].item() for t in targets] == [*a, tok.eos_id]
        assert targets == list(range(n - len(a) - 2, n - 1))
        # 32x32 frames, 16px tiles, 4 tiles max -> 2x2 canvas: id 6 = 1 + index of (2, 2).
        assert supported_aspect_ratios(4).index((2, 2)) + 1 == 6
        assert b["aspect_ratio_ids"][i].tolist() == [6] * f + [0] * (N - f)
        assert b["image_positions"][i].tolist() == list(range(f)) + [-1] * (N - f)
        assert (b["aspect_ratio_mask"][i, :f] == 1).all() and (b["aspect_ratio_mask"][i, f:, 0] == 1).all()
        assert (b["aspect_ratio_mask"][i, f:, 1:] == 0).all() and (b["pixel_values"][i, f:] == 0).all()
        # The frame tokens form one group at the start (HF): image j is seen from its own <|image|> token at
        # position j to the end of the padded row, so every text token sees every frame; padding images: nothing.
        cam = b["cross_attention_mask"][i]
        for j in range(f):
            assert (cam[j, : j + 1] == 1).all() and (cam[j, j + 1 :] == 0).all()
        assert (cam[f:, :f] == 1).all() and (cam[:, f:] == 0).all()
        ref = hf_proc.convert_sparse_cross_attention_mask_to_dense(
            [hf_proc.get_cross_attention_token_mask(b["tokens"][i].tolist(), tok.image_id)], [[4] * f], T, S
        )[0]
        assert np.array_equal(cam[:, :f].numpy(), ref)
    tiles, _ = tile_image(samples[0]["frames"][1], 16, 4)
    assert torch.equal(b["pixel_values"][0, 1], tiles)


def test_collate_errors_name_field():
    tok = WordTokenizer()
    s = _gen(1, frames=4, size=32)[0]
    with pytest.raises(ValueError, match="seq_length"):
        collate([s], tok, seq_length=8, max_images=4, max_num_tiles=4, tile_size=16)
    with pytest.raises(ValueError, match="max_images"):
        collate([s], tok, seq_length=32, max_images=2, max_num_tiles=4, tile_size=16)
    with pytest.raises(ValueError, match="'answer'"):
        collate([{"frames": s["frames"], "question": "x"}], tok, 32, 4, 4, 16)


def test_answer_accuracy():
    labels = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [1, 2, 3, 0], [1, 1, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[0, 6, 7, 9], [5, 6, 8, 0], [9, 9, 3, 9], [0, 0, 0, 0]])
    assert answer_accuracy(pred, labels, mask) == (2, 3)


# --- shards ---------------------------------------------------------------------------------------------------
def test_write_shards_roundtrip(tmp_path, capsys):
    g = _gen(23, frames=4, size=32)
    index = write_shards(g, str(tmp_path), samples_per_shard=10, prefix="vqa", log_every=10)
    assert [s["num_samples"] for s in index["shards"]] == [10, 10, 3] and index["total"] == 23
    assert json.loads((tmp_path / "index.json").read_text()) == index
    assert "[write_shards] 20 samples" in capsys.readouterr().err
    ds = ShardedVideoDataset(str(tmp_path))
    assert len(ds) == 23
    for i in (22, 0, 13, 9, 10):  # random access, any order
        a, b = ds[i], g[i]
        assert np.array_equal(a["frames"], b["frames"]) and a["frames"].dtype == np.uint8
        assert (a["question"], a["answer"], a["qtype"]) == (b["question"], b["answer"], b["qtype"])
    assert ds.question_types == index["question_types"] == sorted({g.plan(i).qtype for i in range(23)})
    # Same layout read by webdataset itself.
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(tmp_path / "vqa-000000.tar"), shardshuffle=False).decode("rgb8")))
    assert np.array_equal(first["000.png"], g[0]["frames"][0]) and first["json"]["answer"] == g[0]["answer"]


def test_sharded_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        ShardedVideoDataset(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        write_shards([], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(_gen(1), str(tmp_path / "y"), samples_per_shard=0)


def _run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], capture_output=True, text=True)


def test_folder_to_wds(tmp_path):
    img_dir = tmp_path / "imgs"
    (img_dir / "clip1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (3, 12, 20, 3), dtype=np.uint8)
    for j, f in enumerate(clip):
        Image.fromarray(f).save(img_dir / "clip1" / f"{j:03d}.png")
    single = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(single).save(img_dir / "a.png")
    lines = [
        {"frames": [f"clip1/{j:03d}.png" for j in range(3)], "question": "what moves?", "answer": "a dot"},
        {"image": "a.png", "prompt": "describe", "response": "noise"},
    ]
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = _run_tool("folder_to_wds.py", "--images", str(img_dir), "--texts", str(texts), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    ds = ShardedVideoDataset(str(tmp_path / "o"))
    assert len(ds) == 2
    assert np.array_equal(ds[0]["frames"], clip) and ds[0]["answer"] == "a dot"
    assert np.array_equal(ds[1]["frames"], single[None]) and ds[1]["question"] == "describe"
    # Errors name the line and the missing field / file.
    argv = ["--images", str(img_dir), "--texts", str(texts), "--out", str(tmp_path / "e")]
    texts.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "a.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*'answer'"):
        folder_to_wds.main(argv)
    texts.write_text(json.dumps({"image": "missing.jpg", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:1: .*missing\.jpg"):
        folder_to_wds.main(argv)
    texts.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:1: .*'frames'"):
        folder_to_wds.main(argv)


def test_make_video_qa_tool(tmp_path):
    make_video_qa.main(["--out", str(tmp_path), "--train", "6", "--eval", "3", "--frames", "4", "--frame-size", "24"])
    tr, ev = ShardedVideoDataset(str(tmp_path / "train")), ShardedVideoDataset(str(tmp_path / "eval"))
    assert (len(tr), len(ev)) == (6, 3)
    g = VideoQAGenerator(3, num_frames=4, frame_size=24, seed=0, split="eval")
    assert np.array_equal(ev[2]["frames"], g[2]["frames"])


# --- sampler --------------------------------------------------------------------------------------------------
def test_sampler_epoch_coverage_and_purity():
    n, gbs, mbs, dp = 24, 8, 2, 2
    seen = []
    for it in range(n // gbs):
        for r in range(dp):
            mb = micro_batches(it, gbs, mbs, r, dp, n, seed=3)
            assert len(mb) == gbs // (mbs * dp) and all(len(x) == mbs for x in mb)
            seen += [i for x in mb for i in x]
    assert sorted(seen) == list(range(n))  # every sample exactly once per epoch over all ranks
    # Pure function of the iteration: same answer called twice, in any order, with no state.
    assert micro_batches(5, gbs, mbs, 1, dp, n, seed=3) == micro_batches(5, gbs, mbs, 1, dp, n, seed=3)
    assert micro_batches(3, gbs, mbs, 0, dp, n, seed=3) != micro_batches(0, gbs, mbs, 0, dp, n, seed=3)
    # Epochs whose size is not a multiple of the global batch: the stream still covers each epoch once.
    stream = [i for it in range(5) for r in range(2) for x in micro_batches(it, 6, 3, r, 2, 10, seed=0) for i in x]
    ordered = [i for it in range(5) for m in range(1) for r in range(2) for i in micro_batches(it, 6, 3, r, 2, 10)[m]]
    assert stream == ordered and sorted(ordered[:10]) == list(range(10)) and sorted(ordered[10:20]) == list(range(10))


def test_sampler_errors_name_fields():
    with pytest.raises(ValueError, match=r"global_batch_size \(10\).*micro_batch_size \* dp_size"):
        micro_batches(0, 10, 2, 0, 2, 100, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches(0, 8, 2, 2, 2, 100, 0)
    with pytest.raises(ValueError, match="num_samples"):
        micro_batches(0, 8, 2, 0, 2, 0, 0)


def test_question_types_cover_all():
    assert set(COUNTS) == set(QUESTION_TYPES["count"][1]) and set(COLORS) == set(QUESTION_TYPES["most"][1])


def _tarfile_scan(path: Path, monkeypatch) -> list:
    """What the tarfile-based scan (the fallback) finds in ``path``."""
    with monkeypatch.context() as patch:
        patch.setattr(shards, "_scan_headers", lambda view: None)
        patch.setattr(shards, "_scanned", {})
        return shards._scan_tar(str(path))


@pytest.mark.parametrize(
    "fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "ustar", "gnu"]
)
def test_the_header_scan_finds_what_tarfile_finds(tmp_path, monkeypatch, fmt):
    """Long names (a pax path, a ustar prefix, a GNU long name), folders and links among the members."""
    long_dir = "d" * 60 + "/" + "e" * 60
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("samples")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, (name, data) in enumerate([("a.json", b"{}"), ("a.000.png", b"x" * 700), (f"{long_dir}/b.json", b"[]")]):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c.json")
        link.type, link.linkname = tarfile.SYMTYPE, "a.json"
        tar.addfile(link)
    found = shards._scan_tar(str(path))
    assert found == _tarfile_scan(path, monkeypatch)
    assert [key for key, _ in found] == ["a", f"{long_dir}/b"]
    raw = path.read_bytes()
    assert raw[slice(*(lambda o, n: (o, o + n))(*found[0][1]["000.png"]))] == b"x" * 700
    if fmt == tarfile.GNU_FORMAT:  # GNU long names are left to tarfile
        assert shards._scan_headers(memoryview(raw)) is None


def test_written_shards_are_scanned_from_their_headers_once_per_process(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    samples = [{"frames": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), "question": "q?", "answer": "a"}] * 5
    shards.write_shards(samples, str(tmp_path / "s"), samples_per_shard=2)
    first = tmp_path / "s" / "shard-000000.tar"
    assert shards._scan_headers(memoryview(first.read_bytes())) == _tarfile_scan(first, monkeypatch)
    dataset = shards.ShardedVideoDataset(str(tmp_path / "s"))
    with monkeypatch.context() as patch:
        patch.setattr(shards, "_scan_headers", lambda view: pytest.fail("a shard was scanned twice"))
        again = shards.ShardedVideoDataset(str(tmp_path / "s"))
    assert len(again) == len(dataset) == 5 and again[4]["question"] == "q?"
