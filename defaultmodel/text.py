"""Word-level tokenizer over ``vocab.json`` and the small learned text encoder.

The tokenizer knows only the caption grammar's words, grouped by category. Unknown words are
an error rather than an ``<unk>`` token: a silent ``<unk>`` would let a typo generate a
plausible but wrong video. Every sequence starts with ``<bos>`` so that the empty prompt
(the unconditional branch of classifier-free guidance) still gets a learned embedding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

PACKAGE_VOCAB = Path(__file__).with_name("vocab.json")
VOCAB_FILENAME = "vocab.json"
PAD, BOS = "<pad>", "<bos>"
DEFAULT_MAX_LENGTH = 20


class WordTokenizer:
    """Maps captions to fixed-length id tensors using a categorised word list."""

    def __init__(self, categories: dict[str, list[str]], max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.categories = {name: list(words) for name, words in categories.items()}
        words = [w for ws in self.categories.values() for w in ws]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique across categories")
        if words[:2] != [PAD, BOS]:
            raise ValueError(f"vocabulary must start with {PAD!r} and {BOS!r}")
        self.max_length = max_length
        self.id_to_word = words
        self.word_to_id = {w: i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids."""
        return len(self.id_to_word)

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        return self.word_to_id[PAD]

    def _unknown_error(self, unknown: list[str]) -> ValueError:
        """Error listing the unknown words and the whole vocabulary by category."""
        lines = [f"unknown word(s) {unknown}; the vocabulary is:"]
        for name, words in self.categories.items():
            if name != "special":
                lines.append(f"  {name}: {', '.join(words)}")
        return ValueError("\n".join(lines))

    def split(self, text: str) -> list[str]:
        """Lower-case words of ``text`` with surrounding punctuation removed."""
        return [w.strip(".,;:!?") for w in text.lower().split() if w.strip(".,;:!?")]

    def encode(self, text: str) -> list[int]:
        """Ids for one caption: ``<bos>``, the words, then padding to ``max_length``."""
        words = self.split(text)
        unknown = [w for w in words if w not in self.word_to_id]
        if unknown:
            raise self._unknown_error(unknown)
        if len(words) + 1 > self.max_length:
            raise ValueError(f"caption has {len(words)} words; at most {self.max_length - 1} fit")
        ids = [self.word_to_id[BOS]] + [self.word_to_id[w] for w in words]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Encode one caption or a list into a ``[B, max_length]`` long tensor."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Words of ``ids`` without special tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(self.id_to_word[i] for i in ids if self.id_to_word[i] not in (PAD, BOS))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the vocabulary (and max length) to ``folder/vocab.json``."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        payload = {"max_length": self.max_length, "categories": self.categories}
        (Path(folder) / VOCAB_FILENAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **_: object) -> WordTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained` (or the package ``vocab.json``)."""
        path = Path(folder)
        path = path / VOCAB_FILENAME if path.is_dir() else path
        payload = json.loads(path.read_text())
        if "categories" in payload:
            return cls(payload["categories"], payload.get("max_length", DEFAULT_MAX_LENGTH))
        return cls(payload)

    @classmethod
    def from_package(cls) -> WordTokenizer:
        """The tokenizer for the package's own ``vocab.json``."""
        return cls.from_pretrained(PACKAGE_VOCAB)


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Token + position embeddings and a small pre-norm transformer encoder.

    Outputs ``[B, L, width]`` embeddings; positions holding padding are zeroed, as Wan's
    pipeline does for its T5 embeddings, so padding carries no information.
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32,
        max_length: int = DEFAULT_MAX_LENGTH,
        width: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, num_heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``[B, L]`` ids into ``[B, L, width]`` with zeros at padded positions."""
        padding = input_ids == self.config.pad_id
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.final_norm(x) * (~padding).unsqueeze(-1).to(x.dtype)
