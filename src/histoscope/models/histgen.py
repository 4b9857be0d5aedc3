"""HistGen (Guo et al., MICCAI 2024): a report from a slide's patch features.

Pure torch; knows nothing of slides. The parts, as in the authors' code
(``modules/histgen_module.py``):

- **Patch embedding**: ``Linear(D, d) + ReLU + Dropout``.
- **Cross-modal context memory**: a learnable memory of ``memory_slots x d``.
  A query attends to it with multi-head attention that keeps only the
  ``top_k`` best-scoring slots per head (``MultiThreadMemory``). Visual side:
  ``prototypes`` patch tokens at evenly spaced positions query the memory and
  every patch token adds a multi-head attention over those responses. Text
  side: every word embedding adds its own memory response.
- **Local-global hierarchical encoder**: patch tokens are cut into regions of
  ``region_size - 1`` patches plus one learnable global token each. Layer 1:
  a transformer layer inside every region, then a slide-level transformer
  layer over the regions' global tokens (which replace them); layer 2: a
  region transformer layer again; LayerNorm; attentive pooling over each
  region's tokens gives one token per region.
- **Decoder**: ``n_layers`` pre-norm transformer layers (masked self-attention,
  cross-attention over the region tokens, feed-forward), ``n_heads`` heads,
  and a linear layer to the vocabulary.

Evidence: while writing a token the decoder's cross-attention (averaged over
heads and layers) is a distribution over regions; each region's attentive
pooling weights, renormalised over its patches (padding and the global token
left out), spread it over patches, so the attention of every token sums to 1
over the slide's patches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from histoscope.reports.tokenizer import BOS, EOS, Tokenizer

__all__ = ["HistGen", "Generated"]


class _MHA(nn.Module):
    """Multi-head attention that also returns its weights (averaged over heads).

    With ``top_k`` only the ``top_k`` best keys per query and head are kept
    (HistGen's memory querying and responding).
    """

    def __init__(self, d: int, heads: int, dropout: float, top_k: int | None = None) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by {heads} heads")
        self.h, self.dk, self.top_k = heads, d // heads, top_k
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        b, tq, _ = q.shape
        tk = k.shape[1]
        qh = self.q(q).view(b, tq, self.h, self.dk).transpose(1, 2)
        kh = self.k(k).view(b, tk, self.h, self.dk).transpose(1, 2)
        vh = self.v(v).view(b, tk, self.h, self.dk).transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.dk)  # (b, h, tq, tk)
        if mask is not None:  # mask: broadcastable to (b, 1, tq, tk), True = keep
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.top_k is not None and self.top_k < tk:
            top, idx = scores.topk(self.top_k, dim=-1)
            p = self.drop(F.softmax(top, -1))
            gathered = vh[:, :, None].expand(b, self.h, tq, tk, self.dk)
            sel = gathered.gather(3, idx[..., None].expand(*idx.shape, self.dk))
            out = (p[..., None, :] @ sel).squeeze(-2)
            w = torch.zeros_like(scores).scatter(-1, idx, p)
        else:
            w = self.drop(F.softmax(scores, -1))
            out = w @ vh
        out = out.transpose(1, 2).reshape(b, tq, self.h * self.dk)
        return self.o(out), w.mean(1)


class _FF(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(d_ff, d))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _EncLayer(nn.Module):
    """Pre-norm self-attention + feed-forward."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.attn, self.ff = _MHA(d, heads, dropout), _FF(d, d_ff, dropout)
        self.n1, self.n2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.n1(x)
        x = x + self.drop(self.attn(y, y, y, mask)[0])
        return x + self.drop(self.ff(self.n2(x)))


class _DecLayer(nn.Module):
    """Pre-norm masked self-attention, cross-attention over regions, feed-forward."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn, self.src_attn = _MHA(d, heads, dropout), _MHA(d, heads, dropout)
        self.ff = _FF(d, d_ff, dropout)
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor,
                causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        y = self.n1(x)
        x = x + self.drop(self.self_attn(y, y, y, causal)[0])
        out, w = self.src_attn(self.n2(x), mem, mem)
        x = x + self.drop(out)
        return x + self.drop(self.ff(self.n3(x))), w


def _positions(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Generated:
    """A generated report: its cleaned text, tokens, sentences and per-sentence patch attention.

    Attributes
    ----------
    text
        Cleaned text (``"sentence . sentence ."``).
    tokens
        Token ids (without begin/end).
    sentences
        Sentences (without the full stop).
    attention
        ``(S, N)``: per sentence, the mean attention of its tokens over the
        ``N`` patches (each row sums to 1).
    score
        Sum of the token log-probabilities.
    """

    def __init__(self, text: str, tokens: Sequence[int], sentences: Sequence[str],
                 attention: np.ndarray, score: float) -> None:  # fmt: skip
        self.text, self.tokens, self.sentences = text, tuple(tokens), tuple(sentences)
        self.attention, self.score = attention, float(score)


class HistGen(nn.Module):
    """HistGen over precomputed patch features.

    Parameters
    ----------
    in_dim
        Patch feature size ``D``.
    vocab
        :meth:`Tokenizer.to_dict` of the report vocabulary.
    d_model
        Model width (512 in the paper).
    n_heads
        Attention heads (8).
    n_layers
        Decoder layers (3).
    d_ff
        Feed-forward width (512).
    dropout
        Dropout (0.1).
    region_size
        Tokens per region, its global token included (96).
    memory_slots
        Rows of the cross-modal memory (2048).
    top_k
        Memory slots kept per query (512).
    prototypes
        Evenly spaced patch tokens that query the memory (512).
    max_len
        Longest token sequence the positional table covers.
    """

    def __init__(self, in_dim: int, vocab: Mapping[str, Any], d_model: int = 512, n_heads: int = 8,
                 n_layers: int = 3, d_ff: int = 512, dropout: float = 0.1, region_size: int = 96,
                 memory_slots: int = 2048, top_k: int = 512, prototypes: int = 512,
                 max_len: int = 160) -> None:  # fmt: skip
        super().__init__()
        if int(region_size) < 2:
            raise ValueError(f"region_size must be at least 2, got {region_size}")
        if not 1 <= int(top_k) <= int(memory_slots):
            raise ValueError(f"top_k must be in 1..memory_slots ({memory_slots}), got {top_k}")
        if int(prototypes) < 1 or int(n_layers) < 1 or int(in_dim) < 1:
            raise ValueError("prototypes, n_layers and in_dim must be at least 1")
        self.tokenizer = Tokenizer.from_dict(dict(vocab))
        d = int(d_model)
        self.in_dim, self.d_model, self.region_size = int(in_dim), d, int(region_size)
        self.n_prototypes, self.max_len = int(prototypes), int(max_len)
        self.config = {"in_dim": self.in_dim, "vocab": self.tokenizer.to_dict(), "d_model": d,
                       "n_heads": int(n_heads), "n_layers": int(n_layers), "d_ff": int(d_ff),
                       "dropout": float(dropout), "region_size": self.region_size,
                       "memory_slots": int(memory_slots), "top_k": int(top_k),
                       "prototypes": self.n_prototypes, "max_len": self.max_len}  # fmt: skip
        self.att_embed = nn.Sequential(nn.Linear(self.in_dim, d), nn.ReLU(), nn.Dropout(dropout))
        self.memory = nn.Parameter(torch.randn(int(memory_slots), d) / d)
        self.cmn = _MHA(d, n_heads, dropout, top_k=int(top_k))
        self.attn_mem = _MHA(d, n_heads, dropout)
        self.global_token = nn.Parameter(torch.randn(1, d) * 0.02)
        self.region_1, self.wsi = (
            _EncLayer(d, n_heads, d_ff, dropout),
            _EncLayer(d, n_heads, d_ff, dropout),
        )
        self.region_2 = _EncLayer(d, n_heads, d_ff, dropout)
        self.enc_norm = nn.LayerNorm(d)
        self.pool_proj, self.pool_v = nn.Linear(d, d), nn.Linear(d, 1, bias=False)
        self.pool_dense = nn.Linear(d, d)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, d)
        self.decoder = nn.ModuleList(
            _DecLayer(d, n_heads, d_ff, dropout) for _ in range(int(n_layers))
        )
        self.dec_norm = nn.LayerNorm(d)
        self.logit = nn.Linear(d, self.tokenizer.vocab_size)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("pe", _positions(max(self.max_len, self.region_size) + 1, d),
                             persistent=False)  # fmt: skip

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HistGen:
        """Rebuild from :attr:`config`."""
        return cls(**dict(config))

    # ------------------------------------------------------------ encoder
    def encode(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region tokens ``(1, R, d)`` and the patch share of each region ``(R, N)``.

        Parameters
        ----------
        feats
            ``(N, D)`` patch features of one slide (``N >= 1``).

        Returns
        -------
        regions, spread
            ``spread[r]`` sums to 1 over the patches of region ``r`` (0 elsewhere).
        """
        if feats.ndim == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.ndim != 2 or feats.shape[0] < 1 or feats.shape[1] != self.in_dim:
            raise ValueError(f"patch features must be (N >= 1, {self.in_dim}), "
                             f"got {tuple(feats.shape)}")  # fmt: skip
        n, d, rs = feats.shape[0], self.d_model, self.region_size
        x = self.att_embed(feats)[None]  # (1, N, d)
        idx = torch.linspace(0, n - 1, steps=self.n_prototypes).round().long()
        resp, _ = self.cmn(x[:, idx], self.memory[None], self.memory[None])
        x = x + self.attn_mem(x, resp, resp)[0]
        per = rs - 1
        r = -(-n // per)
        pad = r * per - n
        x = torch.cat([x[0], x.new_zeros(pad, d)]).view(r, per, d)
        valid = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        valid = torch.cat([valid.view(r, per), torch.ones(r, 1, dtype=torch.bool)], 1)  # (R, rs)
        x = torch.cat([x, self.global_token.expand(r, 1, d)], 1)  # global token last
        key_mask = valid[:, None, None, :]
        x = self.region_1(x + self.pe[:rs], key_mask)
        g = self.wsi((x[:, -1] + self.pe[:r])[None], None)[0]
        x = torch.cat([x[:, :-1], g[:, None]], 1)
        x = self.enc_norm(self.region_2(x, key_mask))
        score = torch.tanh(self.pool_v(self.pool_proj(x))).squeeze(-1).masked_fill(~valid, -1e4)
        w = torch.softmax(score, -1)  # (R, rs)
        regions = torch.tanh(self.pool_dense((w[..., None] * x).sum(1)))[None]
        patch_w = (w[:, :-1] * valid[:, :-1]).reshape(r, per)
        patch_w = patch_w / patch_w.sum(1, keepdim=True).clamp_min(1e-12)
        spread = torch.zeros(r, r * per, dtype=patch_w.dtype)
        for k in range(r):
            spread[k, k * per : (k + 1) * per] = patch_w[k]
        return regions, spread[:, :n]

    # ------------------------------------------------------------ decoder
    def decode(
        self, regions: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``(B, T, V)`` and region attention ``(B, T, R)`` for prefixes ``tokens``."""
        b, t = tokens.shape
        if t > self.pe.shape[0]:
            raise ValueError(f"sequence of {t} tokens is longer than max_len {self.max_len}")
        e = self.embed(tokens) * math.sqrt(self.d_model)
        e = self.drop(e + self.pe[:t])
        mem = self.memory[None].expand(b, -1, -1)
        e = e + self.cmn(e, mem, mem)[0]
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        mem_r = regions.expand(b, -1, -1)
        ws = []
        for layer in self.decoder:
            e, w = layer(e, mem_r, causal)
            ws.append(w)
        return self.logit(self.dec_norm(e)), torch.stack(ws).mean(0)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for teacher forcing on one slide's features."""
        regions, _ = self.encode(feats)
        return self.decode(regions, tokens)[0]

    def loss(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``tokens[1:]`` given ``tokens[:-1]`` (``tokens``: ``[0, ..., 0]``)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        logits = self(feats, tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def encode_report(self, report: str) -> torch.Tensor:
        """``[0, ids..., 0]`` of a raw report, cut to ``max_len``."""
        ids = self.tokenizer.encode(report)
        if len(ids) > self.max_len:
            ids = [*ids[: self.max_len - 1], EOS]
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, feats: torch.Tensor | np.ndarray, *, beam_size: int = 3, max_tokens: int = 100,
                 block_trigrams: bool = True) -> Generated:  # fmt: skip
        """Beam-search a report for one slide's patch features ``(N, D)``."""
        from histoscope.reports.beam import beam_search

        was = self.training
        self.eval()
        try:
            f = torch.as_tensor(np.asarray(feats, np.float32))
            regions, spread = self.encode(f)

            def step(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logits, w = self.decode(regions, prefix)
                return F.log_softmax(logits[:, -1].float(), -1), w[:, -1] @ spread

            hyp = beam_search(step, bos=BOS, eos=EOS, beam_size=beam_size,
                              max_len=min(int(max_tokens), self.max_len - 1),
                              block_trigrams=block_trigrams)  # fmt: skip
        finally:
            self.train(was)
        toks = [t for t in hyp.tokens if t != EOS]
        sents, att = sentence_attention(toks, hyp.attention[: len(toks)], self.tokenizer)
        text = " . ".join(sents) + " ." if sents else ""
        return Generated(text, toks, sents, att, hyp.score)


def sentence_attention(tokens: Sequence[int], attention: np.ndarray,
                       tokenizer: Tokenizer) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """Sentences and the mean token attention of each ``(S, N)``.

    A sentence ends at a full stop token, which counts with it; an empty
    sentence (two full stops in a row) is dropped; trailing words without a
    full stop form a last sentence.
    """
    stop = tokenizer.stop_id
    groups, cur = [], []
    for i, t in enumerate(tokens):
        cur.append(i)
        if t == stop or i == len(tokens) - 1:
            words = [tokens[j] for j in cur if tokens[j] != stop]
            if words:
                groups.append((tokenizer.decode(words), cur))
            cur = []
    n = attention.shape[1] if attention.ndim == 2 else 0
    if not groups:
        return [], np.zeros((0, n), np.float32)
    return [g[0] for g in groups], np.stack([attention[g[1]].mean(0) for g in groups])
