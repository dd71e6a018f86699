"""A long prompt beside running rows: how long do the others wait for their next token?

    .venv/bin/python benchmarks/prefill_stall.py [--prompt 8000] [--hidden 512] [--layers 8]

One `BatchGenerator` on a model built here from a config (random weights, a context window of
32k; 512 hidden x 8 layers is about 25M parameters), one row decoding at T=1, then a request with
a prompt of `--prompt` tokens. Prints, for the prefill whole (chunking off: the code before
session 18) and chunked (the default, `HONED_PREFILL_SLICE_MS`=100), in one run: the time to the
long request's first token, and the decoding row's longest and median gap between tokens while
that prompt was prefilled. Also the `n=16` case: one request's 16 samples of a 2,000-token prompt,
prefilled once or 16 times (the count of prompt positions the model ran). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def stall(generator: Any, engine: Any, prompt_tokens: int) -> dict[str, float]:
    from honed.serving.batching import GenerationRequest

    ticks: list[float] = []
    decoding = GenerationRequest(
        engine.encode("hi"), 100_000, on_token=lambda *_: ticks.append(time.monotonic())
    )
    generator.submit(decoding)
    while len(ticks) < 20:
        time.sleep(0.01)
    word = engine.encode("word")[0]
    first: list[float] = []
    asked = time.monotonic()
    long = generator.submit(
        GenerationRequest([word] * prompt_tokens, 1, on_token=lambda *_: first.append(time.monotonic()))
    )
    long.result(1200)
    decoding.cancelled = True
    during = [t for t in ticks if asked <= t <= first[0]]
    edges = [asked, *during, first[0]]
    gaps = [b - a for a, b in itertools.pairwise(edges)]
    return {
        "first_token_s": round(first[0] - asked, 2),
        "tokens_meanwhile": len(during),
        "max_gap_s": round(max(gaps), 3),
        "median_gap_s": round(statistics.median(gaps), 3),
    }


def shared(generator: Any, engine: Any, prompt_tokens: int, n: int = 16) -> int:
    """Prompt positions the model ran for one request's `n` samples of one prompt."""
    from honed.serving.batching import GenerationRequest

    before = generator.stats["prefill_tokens"]
    word = engine.encode("word")[0]
    futures = [generator.submit(GenerationRequest([word] * prompt_tokens, 2)) for _ in range(n)]
    for future in futures:
        future.result(1200)
    return generator.stats["prefill_tokens"] - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    import honed.serving.batching as batching
    from honed.demo.tiny import build_tiny
    from honed.serving.engine import load_engine

    root = Path(tempfile.mkdtemp(prefix="honed-stall-"))
    path = build_tiny(
        root / "model", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, max_position_embeddings=32768,
    )  # fmt: skip
    engine = load_engine(str(path))
    results: dict[str, Any] = {"prompt": args.prompt, "hidden": args.hidden, "layers": args.layers}
    default_slice = batching.PREFILL_SLICE_S
    for arm, slice_s in (("whole", 1e9), ("chunked", default_slice)):
        batching.PREFILL_SLICE_S = slice_s
        generator = batching.BatchGenerator(
            engine.generator.model, engine.tokenizer, eos_ids=[], pad_id=engine.generator.pad_id
        )
        try:
            results[arm] = stall(generator, engine, args.prompt)
            print(f"{arm:8s} {results[arm]}", flush=True)
        finally:
            generator.close()
    batching.PREFILL_SLICE_S = default_slice
    generator = batching.BatchGenerator(
        engine.generator.model, engine.tokenizer, eos_ids=[], pad_id=engine.generator.pad_id, window_s=0.2
    )
    try:
        ran = shared(generator, engine, 2000)
    finally:
        generator.close()
    results["n16_prefill_positions"] = ran
    print(f"n=16 of a 2,000-token prompt: {ran} prompt positions run (16 prefills: 32,000)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
