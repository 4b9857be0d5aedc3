"""HistGen: tokenizer, beam search, trigram blocking, per-sentence evidence, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from histoscope.models.histgen import HistGen, sentence_attention
from histoscope.reports.beam import beam_search, blocked
from histoscope.reports.tokenizer import UNK, Tokenizer, clean_report, display, split_sentences

REPORTS = [
    "Lung, biopsy: Diagnosis: non-small cell carcinoma. Tumour extent: 70% of tissue, "
    "greatest dimension 1.9 mm. Comedo-type necrosis is identified.",
    "Specimen: colon. Negative for malignancy. The tissue includes smooth muscle.",
    "Sections of colon tissue are examined. The sections show adenocarcinoma. "
    "Necrosis is absent. The margin is involved by tumour.",
]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, threshold: int = 1, **kw) -> HistGen:
    torch.manual_seed(seed)
    tok = Tokenizer.build(REPORTS, threshold)
    cfg = {"d_model": 32, "n_heads": 8, "n_layers": 3, "d_ff": 64, "dropout": 0.0,
           "region_size": 8, "memory_slots": 32, "top_k": 8, "prototypes": 16, **kw}  # fmt: skip
    return HistGen(16, tok.to_dict(), **cfg).eval()


# ------------------------------------------------------------------ tokenizer
def test_clean_report_lowercases_strips_punctuation_and_keeps_decimals():
    c = clean_report(REPORTS[0])
    assert c == ("lung biopsy diagnosis non small cell carcinoma . tumour extent 70 of tissue "
                 "greatest dimension 1.9 mm . comedo type necrosis is identified .")  # fmt: skip
    assert split_sentences(c)[1] == "tumour extent 70 of tissue greatest dimension 1.9 mm"
    assert display(c).startswith("Lung biopsy diagnosis non small cell carcinoma. Tumour extent")


def test_tokenizer_round_trip():
    tok = Tokenizer.build(REPORTS, 1)
    for r in REPORTS:
        ids = tok.encode(r)
        assert ids[0] == 0 and ids[-1] == 0 and 0 not in ids[1:-1]
        assert tok.decode(ids) == clean_report(r)
    assert Tokenizer.from_dict(tok.to_dict()) == tok


def test_threshold_keeps_frequent_words_and_maps_the_rest_to_unk():
    tok = Tokenizer.build(REPORTS, 2)
    assert "colon" in tok.words and "necrosis" in tok.words  # twice and three times
    assert "lung" not in tok.words and "muscle" not in tok.words  # once
    assert tok.decode(tok.encode("Lung muscle necrosis.")) == f"{UNK} {UNK} necrosis ."
    assert tok.words == tuple(sorted(tok.words))
    with pytest.raises(ValueError, match="threshold"):
        Tokenizer.build(REPORTS, 0)


# ------------------------------------------------------------------ beam search
def greedy(model: HistGen, feats: torch.Tensor, max_len: int) -> list[int]:
    """Argmax decoding written out on its own, without the beam code."""
    regions, _ = model.encode(feats)
    seq = [0]
    with torch.no_grad():
        for _ in range(max_len):
            logits, _, _ = model.decode(regions, torch.tensor([seq]))
            nxt = int(logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == 0:
                break
    return seq[1:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy(seed):
    model = tiny(seed)
    feats = torch.randn(21, 16, generator=torch.Generator().manual_seed(seed))
    regions, spread = model.encode(feats)

    def step(prefix):
        logits, w, _ = model.decode(regions, prefix)
        return torch.log_softmax(logits[:, -1], -1), w[:, -1] @ spread

    hyp = beam_search(step, bos=0, eos=0, beam_size=1, max_len=30, block_trigrams=False)
    assert list(hyp.tokens) == greedy(model, feats, 30)


def test_wider_beam_never_scores_below_greedy():
    model = tiny(3)
    feats = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    regions, spread = model.encode(feats)

    def step(prefix):
        logits, w, _ = model.decode(regions, prefix)
        return torch.log_softmax(logits[:, -1], -1), w[:, -1] @ spread

    g = beam_search(step, bos=0, eos=0, beam_size=1, max_len=12, block_trigrams=False)
    b = beam_search(step, bos=0, eos=0, beam_size=3, max_len=12, block_trigrams=False)
    if g.finished and b.finished:
        assert b.score >= g.score - 1e-6


def _looping_step(vocab: int = 6):
    """A step function that wants to repeat 1 2 3 1 2 3 ... and never to end."""

    def step(prefix):
        logp = torch.full((prefix.shape[0], vocab), -5.0)
        for k, row in enumerate(prefix.tolist()):
            want = row[-1] % 3 + 1
            logp[k, want] = -0.01
            logp[k, 4] = -1.0  # the second choice
            logp[k, 0] = -20.0
        return logp, torch.full((prefix.shape[0], 4), 0.25)

    return step


def trigrams(seq):
    return [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]


@pytest.mark.parametrize("beam", [1, 3])
def test_trigram_blocking_never_repeats_a_trigram(beam):
    free = beam_search(_looping_step(), bos=0, eos=0, beam_size=beam, max_len=25,
                       block_trigrams=False)  # fmt: skip
    assert len(set(trigrams(free.tokens))) < len(trigrams(free.tokens))  # it does loop
    hyp = beam_search(_looping_step(), bos=0, eos=0, beam_size=beam, max_len=25)
    tri = trigrams(hyp.tokens)
    assert len(tri) > 3 and len(set(tri)) == len(tri)


def test_blocked_lists_the_third_words_of_matching_trigrams():
    assert blocked([1, 2, 3, 1, 2]) == {3}
    assert blocked([1, 2, 3, 1, 2, 5, 1, 2]) == {3, 5}
    assert blocked([1]) == set()


# ------------------------------------------------------------------ evidence
def test_each_sentence_attention_sums_to_one_over_patches():
    model = tiny(4)
    n = 37  # five regions of 7 patches, the last one padded
    g = model.generate(torch.randn(n, 16), beam_size=3, max_tokens=40)
    assert g.attention.shape == (len(g.sentences), n)
    assert (g.attention >= 0).all()
    np.testing.assert_allclose(g.attention.sum(1), 1.0, atol=1e-5)


def test_region_spread_covers_each_patch_once():
    model = tiny(5)
    _, spread = model.encode(torch.randn(20, 16))
    s = spread.detach().numpy()
    assert s.shape == (3, 20)  # regions of 7 patches + the global token
    assert ((s > 0).sum(0) == 1).all()  # every patch in exactly one region
    assert [np.flatnonzero(r).tolist() for r in s][2] == list(range(14, 20))


def test_sentence_attention_groups_tokens_at_full_stops():
    tok = Tokenizer.build(REPORTS, 1)
    words = "necrosis is absent . the margin is involved by tumour .".split()
    ids = [tok.id_of(w) for w in words]
    att = np.eye(len(ids))
    sents, a = sentence_attention(ids, att, tok)
    assert sents == ["necrosis is absent", "the margin is involved by tumour"]
    np.testing.assert_allclose(a[0, :4], 0.25)
    np.testing.assert_allclose(a[1, 4:], 1 / 7)


# ------------------------------------------------------------------ model
def test_training_a_few_steps_learns_one_report():
    model = tiny(6).train()
    feats = torch.randn(12, 16)
    target = model.encode_report(REPORTS[1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(80):
        loss = model.loss(feats, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.generate(feats).text == clean_report(REPORTS[1])


def test_checkpoint_round_trip_under_family_histgen(tmp_path):
    from histoscope.checkpoints import ModelCard, load_checkpoint, save_checkpoint
    from histoscope.errors import CheckpointError

    model = tiny(7)
    path = save_checkpoint(tmp_path / "h.safetensors", model,
                           ModelCard(family="histgen", config=model.config))  # fmt: skip
    loaded, card = load_checkpoint(path, family="histgen")
    feats = torch.randn(9, 16)
    assert loaded.generate(feats).tokens == model.generate(feats).tokens
    with pytest.raises(CheckpointError):
        load_checkpoint(path, family="clam")


@dataclass(frozen=True)
class Bad:
    id: str
    kw: dict


@pytest.mark.parametrize("case", [Bad("topk", {"top_k": 64}), Bad("region", {"region_size": 1}),
                                  Bad("heads", {"n_heads": 5})], ids=lambda c: c.id)  # fmt: skip
def test_bad_config_is_refused(case):
    with pytest.raises(ValueError):
        tiny(**case.kw)


def test_wrong_feature_size_is_refused():
    with pytest.raises(ValueError, match=r"\(N >= 1, 16\)"):
        tiny().generate(torch.randn(5, 8))


def test_a_batch_of_slides_encodes_and_scores_each_slide_as_alone():
    model = tiny(8)
    g = torch.Generator().manual_seed(8)
    feats = [torch.randn(n, 16, generator=g) for n in (5, 23, 14)]  # 1, 4 and 2 regions
    regions, rmask, spreads = model.encode_batch(feats)
    assert rmask.sum(1).tolist() == [1, 4, 2]
    toks = [model.encode_report(r) for r in REPORTS]
    for i, f in enumerate(feats):
        alone, spread = model.encode(f)
        torch.testing.assert_close(regions[i, : alone.shape[1]], alone[0])
        torch.testing.assert_close(spreads[i], spread)
    batch = model.loss_batch(feats, toks)
    per_slide = [model.loss(f, t) for f, t in zip(feats, toks, strict=True)]
    n_tok = torch.tensor([len(t) - 1 for t in toks], dtype=torch.float32)
    torch.testing.assert_close(batch, (torch.stack(per_slide) * n_tok).sum() / n_tok.sum())
