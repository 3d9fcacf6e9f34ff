"""Tokenizers that need no download, plus a wrapper for a local Hugging Face tokenizer.

All share one interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and the
special ids ``pad_id``, ``bos_id``, ``eos_id``, ``image_id``. Following Llama-3.2-Vision, the text holds one
``<|image|>`` token per image (here: per video frame).
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from lvx_megatron.data.checks import cut
from lvx_megatron.data.video_qa import vocabulary

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IMAGE_TOKEN = "<|image|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)  # ids 0..3 in our tokenizers

# Special tokens are matched first so "<|image|>" in a text is one token, not punctuation + words.
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_WORD_RE = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")

TOKENIZER_KINDS: tuple[str, ...] = ("words", "bytes", "huggingface")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int
    image_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class WordTokenizer:
    """Closed vocabulary: the special tokens + every word the synthetic video QA generator can emit.

    Text is split into words and single punctuation marks. Decoding joins words with spaces and glues
    punctuation to the previous word, so ``decode(encode(q)) == q`` for the generator's texts.
    """

    def __init__(self, words: list[str] | None = None) -> None:
        # Built from the generator's word lists by default so the two cannot drift apart.
        words = vocabulary() if words is None else list(words)
        self.itos: list[str] = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id = (self.stoi[t] for t in SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``; raises ValueError naming the first out-of-vocabulary word."""
        ids = []
        for w in _WORD_RE.findall(text):
            if w not in self.stoi:
                raise ValueError(
                    f"word {cut(repr(w))} is not in the WordTokenizer vocabulary ({self.vocab_size} tokens: the "
                    "video QA generator's words); use the 'bytes' or 'huggingface' tokenizer for arbitrary text"
                )
            ids.append(self.stoi[w])
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; punctuation attaches to the previous word."""
        out = ""
        for i in ids:
            w = self.itos[int(i)]
            if out and not (len(w) == 1 and not w.isalnum() and not w.isspace()):
                out += " "
            out += w
        return out


class ByteTokenizer:
    """UTF-8 bytes (ids 4..259) + the four special tokens (ids 0..3): lossless for any text."""

    offset = len(SPECIAL_TOKENS)

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.image_id = range(len(SPECIAL_TOKENS))

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str) -> list[int]:
        """Byte ids of ``text``; special-token strings such as ``<|image|>`` become their single id."""
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS.index(part))
            else:
                ids.extend(b + self.offset for b in part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; invalid UTF-8 sequences become U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < self.offset:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(SPECIAL_TOKENS[i])
            elif i < self.vocab_size:
                buf.append(i - self.offset)
            else:
                raise ValueError(f"token id {i} out of range for ByteTokenizer (vocab_size {self.vocab_size})")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A local ``transformers.AutoTokenizer`` (no download) exposing the common interface."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer  # heavy import: only when this kind is used

        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        vocab = self.hf.get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(
                f"tokenizer at {path!r} has no {IMAGE_TOKEN} token; the model needs one {IMAGE_TOKEN} per "
                "image/frame (Llama-3.2-Vision tokenizers have it)"
            )
        self.image_id = int(vocab[IMAGE_TOKEN])
        if self.hf.bos_token_id is None or self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} must define bos_token and eos_token")
        self.bos_id = int(self.hf.bos_token_id)
        self.eos_id = int(self.hf.eos_token_id)
        # Pad positions are never trained on (loss_mask 0), so eos is a safe pad when none is defined.
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids without automatically added bos/eos (the collator adds them)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


def build_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
    """Tokenizer by kind: "words" (synthetic QA vocabulary), "bytes" (any text), "huggingface" (local ``path``)."""
    if kind == "words":
        return WordTokenizer()
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "huggingface":
        if not path:
            raise ValueError("path is required for tokenizer kind 'huggingface' (a local tokenizer folder)")
        return HFTokenizer(path)
    raise ValueError(f"tokenizer kind must be one of {list(TOKENIZER_KINDS)}, got {kind!r}")
