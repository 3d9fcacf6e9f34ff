"""Data pipeline: synthetic video QA, tokenizers, Mllama tiling and batching, webdataset shards, video clips
with JSONL, energon datasets, DP sampling.

Depends on torch, numpy, PIL, PyAV (video clips) and webdataset (for writing shards); ``energon``
(clips as megatron-energon datasets, imported on its own) on megatron-energon; never on megatron-core.
"""

from lvx_megatron.data.batch import answer_accuracy, collate, encode_sample
from lvx_megatron.data.sampler import micro_batches
from lvx_megatron.data.shards import ShardedVideoDataset, ShardError, write_shards
from lvx_megatron.data.tiling import (
    IMAGE_MEAN,
    IMAGE_STD,
    cross_attention_token_mask,
    supported_aspect_ratios,
    tile_image,
    tile_images,
)
from lvx_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, WordTokenizer, build_tokenizer
from lvx_megatron.data.video import VideoError, VideoJsonlDataset, decode_clip, select_frames, write_clip
from lvx_megatron.data.video_qa import VideoQAGenerator, chance_accuracy, vocabulary

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "ByteTokenizer",
    "HFTokenizer",
    "ShardError",
    "ShardedVideoDataset",
    "Tokenizer",
    "VideoError",
    "VideoJsonlDataset",
    "VideoQAGenerator",
    "WordTokenizer",
    "answer_accuracy",
    "build_tokenizer",
    "chance_accuracy",
    "collate",
    "cross_attention_token_mask",
    "decode_clip",
    "encode_sample",
    "micro_batches",
    "select_frames",
    "supported_aspect_ratios",
    "tile_image",
    "tile_images",
    "vocabulary",
    "write_clip",
    "write_shards",
]
