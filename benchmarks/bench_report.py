"""Draft reports (HistGen): generation time per slide after features, and the metric table.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_report.py --data out/data/histgen

``--data`` is a HistGen-layout folder (``reports.json``, ``features/<id>.h5``,
``slides/<id>.report.json``), e.g. the one ``histoscope train
training/histgen.yaml`` writes. For every slide of the split the embedded
default (or ``--checkpoint``) writes a report from the slide's cached feature
table, with beam 3 (the default) and with beam 1; the time per slide is the
wall time of :meth:`HistGen.generate` alone (features are read before the
clock starts), on one CPU thread. Then :func:`histoscope.training.histgen.evaluate`
scores HistGen, the retrieval baseline, the template + classifier baseline and
the reference reports on the same slides, and the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from histoscope._data import sample_data_path
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training.histgen import evaluate, load_data, metric_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--checkpoint", default=str(sample_data_path("histgen_default.safetensors")))
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=Path("out/bench/report"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, card = load_checkpoint(args.checkpoint, family="histgen")
    samples = load_data(args.data, {}, args.split)
    timing = {}
    for beam in (3, 1):
        secs, words = [], []
        for s in samples:
            t0 = time.perf_counter()
            g = model.generate(s.features, beam_size=beam)
            secs.append(time.perf_counter() - t0)
            words.append(len(g.tokens))
        timing[f"beam_{beam}"] = {"median_s": statistics.median(secs), "mean_s": statistics.mean(secs),
                                  "max_s": max(secs), "mean_tokens": statistics.mean(words)}  # fmt: skip
    tiles = [len(s.features) for s in samples]
    res = evaluate(args.checkpoint, args.data, args.out, split=args.split)
    doc = {"checkpoint": args.checkpoint, "sha256": card.sha256, "split": args.split,
           "n_slides": len(samples), "tiles_per_slide": {"min": min(tiles), "max": max(tiles),
                                                          "mean": statistics.mean(tiles)},
           "generation": timing, "table": res["table"], "machine": platform.platform(),
           "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "table"}, indent=2))
    print(metric_table(res["table"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
