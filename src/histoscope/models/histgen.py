"""HistGen (Guo et al., MICCAI 2024): a report from a slide's patch features.

Pure torch; knows nothing of slides. The parts, as in the authors' code
(``modules/histgen_module.py``):

- **Patch embedding**: ``Linear(D, d) + ReLU + Dropout``, after standardising
  each feature with the training slides' mean and std (buffers saved with the
  weights; the authors feed raw features).
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
    (HistGen's memory querying and responding). Dropout is applied to the
    sublayer outputs, not to the attention weights (cheaper on a CPU; the
    authors drop attention weights too).
    """

    def __init__(self, d: int, heads: int, top_k: int | None = None) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by {heads} heads")
        self.h, self.dk, self.top_k = heads, d // heads, top_k
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

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
        if self.top_k is not None and self.top_k < tk:  # keep the top-k keys only
            idx = scores.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        w = F.softmax(scores, -1)
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
        self.attn, self.ff = _MHA(d, heads), _FF(d, d_ff, dropout)
        self.n1, self.n2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.n1(x)
        x = x + self.drop(self.attn(y, y, y, mask)[0])
        return x + self.drop(self.ff(self.n2(x)))


class _DecLayer(nn.Module):
    """Pre-norm masked self-attention, cross-attention over regions, feed-forward."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn, self.src_attn = _MHA(d, heads), _MHA(d, heads)
        self.ff = _FF(d, d_ff, dropout)
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, causal: torch.Tensor | None,
                past: torch.Tensor | None = None, mem_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Outputs, cross-attention weights and the normalised inputs (the keys of later steps).

        With ``past`` (the normalised inputs of the earlier positions) ``x``
        holds only the new positions.
        """
        y = self.n1(x)
        keys = y if past is None else torch.cat([past, y], 1)
        x = x + self.drop(self.self_attn(y, keys, keys, causal)[0])
        out, w = self.src_attn(self.n2(x), mem, mem, mem_mask)
        x = x + self.drop(out)
        return x + self.drop(self.ff(self.n3(x))), w, keys


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
        self.cmn = _MHA(d, n_heads, top_k=int(top_k))
        self.attn_mem = _MHA(d, n_heads)
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
        # per-feature standardisation, set from the training slides (identity until then)
        self.register_buffer("feat_mean", torch.zeros(self.in_dim))
        self.register_buffer("feat_std", torch.ones(self.in_dim))
        self.register_buffer("pe", _positions(max(self.max_len, self.region_size) + 1, d),
                             persistent=False)  # fmt: skip

    def set_feature_stats(self, feats: Sequence[np.ndarray]) -> None:
        """Standardise patch features with the mean and std of these slides' patches."""
        allf = torch.from_numpy(np.concatenate([np.asarray(f, np.float32) for f in feats]))
        self.feat_mean.copy_(allf.mean(0))
        self.feat_std.copy_(allf.std(0).clamp_min(1e-6))

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
        regions, _, spreads = self.encode_batch([feats])
        return regions, spreads[0]

    def encode_batch(
        self, feats: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Several slides at once: regions ``(B, R_max, d)``, their mask and each slide's spread.

        Each slide is encoded exactly as alone (padding never reaches a
        slide's own tokens): regions are independent, and the slide-level layer
        and the decoder mask the regions a slide does not have.
        """
        for f in feats:
            if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] != self.in_dim:
                raise ValueError(f"patch features must be (N >= 1, {self.in_dim}), "
                                 f"got {tuple(f.shape)}")  # fmt: skip
        b, d, rs = len(feats), self.d_model, self.region_size
        per = rs - 1
        ns = [int(f.shape[0]) for f in feats]
        padded = feats[0].new_zeros(b, max(ns), self.in_dim)
        for i, f in enumerate(feats):
            padded[i, : ns[i]] = f
        x = self.att_embed((padded - self.feat_mean) / self.feat_std)  # (B, N_max, d)
        idx = torch.stack([torch.linspace(0, n - 1, steps=self.n_prototypes).round().long()
                           for n in ns])  # fmt: skip
        protos = x.gather(1, idx[..., None].expand(-1, -1, d))
        mem = self.memory[None].expand(b, -1, -1)
        resp, _ = self.cmn(protos, mem, mem)
        x = x + self.attn_mem(x, resp, resp)[0]
        rcount = [-(-n // per) for n in ns]
        blocks, valid = [], []
        for i, n in enumerate(ns):
            pad = rcount[i] * per - n
            blocks.append(torch.cat([x[i, :n], x.new_zeros(pad, d)]).view(rcount[i], per, d))
            v = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
            valid.append(v.view(rcount[i], per))
        r_all = sum(rcount)
        xr = torch.cat([torch.cat(blocks), self.global_token.expand(r_all, 1, d)], 1)
        ok = torch.cat([torch.cat(valid), torch.ones(r_all, 1, dtype=torch.bool)], 1)  # (R, rs)
        key_mask = ok[:, None, None, :]
        xr = self.region_1(xr + self.pe[:rs], key_mask)
        r_max = max(rcount)
        rmask = torch.zeros(b, r_max, dtype=torch.bool)
        slot = torch.cat([torch.arange(rc) + i * r_max for i, rc in enumerate(rcount)])
        for i, rc in enumerate(rcount):
            rmask[i, :rc] = True
        g = xr.new_zeros(b * r_max, d).index_copy(0, slot, xr[:, -1]).view(b, r_max, d)
        g = self.wsi(g + self.pe[:r_max], rmask[:, None, None, :]).reshape(b * r_max, d)[slot]
        xr = torch.cat([xr[:, :-1], g[:, None]], 1)
        xr = self.enc_norm(self.region_2(xr, key_mask))
        score = torch.tanh(self.pool_v(self.pool_proj(xr))).squeeze(-1).masked_fill(~ok, -1e4)
        w = torch.softmax(score, -1)  # (R, rs)
        pooled = torch.tanh(self.pool_dense((w[..., None] * xr).sum(1)))
        regions = pooled.new_zeros(b * r_max, d).index_copy(0, slot, pooled).view(b, r_max, d)
        patch_w = w[:, :-1] * ok[:, :-1]
        patch_w = patch_w / patch_w.sum(1, keepdim=True).clamp_min(1e-12)
        spreads, start = [], 0
        for n, rc in zip(ns, rcount, strict=True):
            sp = patch_w.new_zeros(rc, rc * per)
            for k in range(rc):
                sp[k, k * per : (k + 1) * per] = patch_w[start + k]
            spreads.append(sp[:, :n])
            start += rc
        return regions, rmask, spreads

    # ------------------------------------------------------------ decoder
    def decode(self, regions: torch.Tensor, tokens: torch.Tensor,
               past: Sequence[torch.Tensor] | None = None, region_mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Next-token logits ``(B, T, V)``, region attention ``(B, T, R)`` and the layer cache.

        Parameters
        ----------
        regions
            ``(1, R, d)`` from :meth:`encode`.
        tokens
            ``(B, T)`` prefixes (begin token first).
        past
            The cache this method returned for ``tokens[:, :-1]``: then only the
            last position is computed (and returned).
        region_mask
            ``(B, R)`` False on padding regions (batched slides).
        """
        b, t = tokens.shape
        if t > self.pe.shape[0]:
            raise ValueError(f"sequence of {t} tokens is longer than max_len {self.max_len}")
        start = 0 if past is None else t - 1
        e = self.embed(tokens[:, start:]) * math.sqrt(self.d_model)
        e = self.drop(e + self.pe[start:t])
        mem = self.memory[None].expand(b, -1, -1)
        e = e + self.cmn(e, mem, mem)[0]
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None] if past is None else None
        mem_r = regions.expand(b, -1, -1)
        rm = None if region_mask is None else region_mask[:, None, None, :]
        ws, cache = [], []
        for i, layer in enumerate(self.decoder):
            e, w, keys = layer(e, mem_r, causal, None if past is None else past[i], rm)
            ws.append(w)
            cache.append(keys)
        return self.logit(self.dec_norm(e)), torch.stack(ws).mean(0), cache

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for teacher forcing on one slide's features."""
        regions, _ = self.encode(feats)
        return self.decode(regions, tokens)[0]

    def loss(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``tokens[1:]`` given ``tokens[:-1]`` (``tokens``: ``[0, ..., 0]``)."""
        return self.loss_batch([feats], [tokens.reshape(-1)])

    def loss_batch(
        self, feats: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean token cross-entropy over several slides (reports padded, padding not scored)."""
        regions, rmask, _ = self.encode_batch(feats)
        lens = [len(t) for t in tokens]
        seq = tokens[0].new_zeros(len(tokens), max(lens))
        target = torch.full((len(tokens), max(lens) - 1), -100, dtype=torch.long)
        for i, t in enumerate(tokens):
            seq[i, : lens[i]] = t
            target[i, : lens[i] - 1] = t[1:]
        logits = self.decode(regions, seq[:, :-1], region_mask=rmask)[0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=-100)  # fmt: skip

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

            cache: dict[tuple[int, ...], list[torch.Tensor]] = {}

            def step(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                rows = [tuple(r) for r in prefix.tolist()]
                parents = [cache.get(r[:-1]) for r in rows]
                past = None
                if all(p is not None for p in parents):
                    past = [torch.cat([p[i] for p in parents]) for i in range(len(self.decoder))]
                logits, w, new = self.decode(regions, prefix, past)
                cache.clear()
                cache.update({r: [c[k : k + 1] for c in new] for k, r in enumerate(rows)})
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
