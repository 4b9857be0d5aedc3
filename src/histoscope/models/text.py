"""Metadata text encoders for iSight: clinical text -> one vector per sample.

Two kinds, chosen by name (``meta_encoder`` in the iSight card):

- ``"hashed"``: a hashed bag of words and word pairs (:func:`encode_metadata`)
  into a trained ``EmbeddingBag``. Needs no tokenizer or weights; the default.
- ``"open_clip:<model>"``: the text tower of an open_clip architecture
  (``open_clip:ViT-L-14-336`` is the paper's CLIP), frozen, with its own BPE
  tokenizer (shipped inside open_clip, so nothing is downloaded) and a trained
  linear projection to the model's width. Its weights come from a local file
  (``meta_weights``: an open_clip ``.safetensors`` / ``.bin``, the whole CLIP
  or the text tower alone, read without unpickling code); without one the
  tower is randomly initialised, which is only useful for tests.

Both expose ``tokenize(texts) -> (B, T) int64`` and ``forward(tokens) -> (B, dim)``.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence

import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9]+")


def encode_metadata(
    texts: Sequence[str | None], buckets: int = 4096, max_tokens: int = 32
) -> torch.Tensor:
    """Hash words (and word pairs) of each text into ``[1, buckets)``; 0 pads.

    Returns ``(B, max_tokens)`` int64, one row per text (``None`` -> all padding).
    """
    rows = torch.zeros(len(texts), max_tokens, dtype=torch.long)
    for i, text in enumerate(texts):
        words = _WORD.findall((text or "").lower())
        grams = words + [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
        ids = [1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams][:max_tokens]
        if ids:
            rows[i, : len(ids)] = torch.tensor(ids)
    return rows


class HashedTextEncoder(nn.EmbeddingBag):
    """Mean of trained embeddings of the hashed words of a text (padding id 0)."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__(buckets, dim, mode="mean", padding_idx=0)
        self.buckets = buckets

    def tokenize(self, texts: Sequence[str | None]) -> torch.Tensor:
        """``(B, 32)`` hashed ids in this encoder's buckets."""
        return encode_metadata(list(texts), buckets=self.buckets)


class ClipTextEncoder(nn.Module):
    """A frozen open_clip text tower and a trained projection to ``dim``.

    Parameters
    ----------
    model_name
        An open_clip architecture name (``ViT-L-14-336``, ``ViT-B-16``, ...)
        whose tokenizer ships with open_clip.
    dim
        Output width.
    weights
        Local open_clip weights (see the module docstring), or ``None``.
    """

    def __init__(self, model_name: str, dim: int, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from histoscope.models.backbones import open_clip_model

        clip = open_clip_model(model_name, "meta_encoder")  # says what to install if missing
        import open_clip

        clip.visual = nn.Identity()  # only the text tower is kept (and saved)
        self.clip = clip
        self._tokenizer = open_clip.get_tokenizer(model_name)
        if weights is not None:
            load_text_weights(clip, weights)
        clip.requires_grad_(False)
        clip.eval()
        with torch.no_grad():
            width = int(clip.encode_text(self._tokenizer([""])).shape[-1])
        self.proj = nn.Linear(width, dim)

    def train(self, mode: bool = True) -> ClipTextEncoder:
        super().train(mode)
        self.clip.eval()  # frozen: its dropout never runs
        return self

    def tokenize(self, texts: Sequence[str | None]) -> torch.Tensor:
        """``(B, context_length)`` BPE token ids (empty text for ``None``)."""
        return self._tokenizer([t or "" for t in texts])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.clip.encode_text(tokens)
        return self.proj(feats.float())


def load_text_weights(clip: nn.Module, path: str | os.PathLike) -> None:
    """Load the text-tower tensors of an open_clip weights file into ``clip``.

    Image-tower tensors (``visual.*``) in the file are ignored.

    Raises
    ------
    CheckpointError
        Naming the file and a missing or mis-shaped text tensor.
    """
    from histoscope.models.backbones import load_matching, read_state_dict

    sd = {}
    for k, v in read_state_dict(path, strip_prefixes=False).items():
        for prefix in ("module.", "model.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if not k.startswith("visual."):
            sd[k] = v
    load_matching(clip, sd, path, "text-tower")


def create_text_encoder(
    name: str, dim: int, *, buckets: int = 4096, weights: str | os.PathLike | None = None
) -> nn.Module | None:
    """The metadata encoder called ``name`` (``"hashed"`` or ``"open_clip:<model>"``).

    Returns ``None`` for ``"hashed"`` with ``buckets=0`` (metadata disabled).
    """
    if name == "hashed":
        if weights is not None:
            raise ValueError("meta_weights applies to an open_clip text encoder, not 'hashed'")
        return HashedTextEncoder(buckets, dim) if buckets else None
    if name.startswith("open_clip:"):
        return ClipTextEncoder(name.split(":", 1)[1], dim, weights)
    raise ValueError(f"meta_encoder must be 'hashed' or 'open_clip:<model>', not {name!r}")
