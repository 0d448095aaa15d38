"""Caption tokenization per batch: open_clip's tokenizer vs tokzoo's memoised one, first sight and cached.

    python benchmarks/tokenizer.py                 # 64 captions of the default shapes dataset, context 32
    python benchmarks/tokenizer.py --batch-size 256 --context 77

The first tokzoo call on a batch fills the cache (every caption is new, as in a run's first epoch); the cached
figure is what every later epoch pays. Medians over --repeats calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from open_clip.tokenizer import SimpleTokenizer

from tokzoo.data import build_dataset
from tokzoo.text.tokenizer import ClipBPETokenizer, _bpe_ids


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", type=int, default=32, help="context length (the default config's is 32)")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)

    dataset = build_dataset("shapes", split="train")
    batches = [
        [dataset[i]["caption"] for i in range(start, start + args.batch_size)]
        for start in range(0, args.batch_size * args.repeats, args.batch_size)
    ]
    reference, ours = SimpleTokenizer(), ClipBPETokenizer(args.context)
    reference(batches[0], context_length=args.context)  # warm both up (regexes, BPE merges)
    _bpe_ids.cache_clear()

    unseen = iter(batches)
    first = median_ms(lambda: ours(next(unseen)), len(batches))
    cached = median_ms(lambda: ours(batches[0]), args.repeats)
    again = iter(batches)
    open_clip = median_ms(lambda: reference(next(again), context_length=args.context), len(batches))
    print(f"{args.batch_size} captions, context {args.context}, medians of {args.repeats} batches:")
    print(f"  open_clip SimpleTokenizer   {open_clip:7.2f} ms")
    print(f"  tokzoo, captions unseen     {first:7.2f} ms")
    print(f"  tokzoo, captions cached     {cached:7.2f} ms  ({open_clip / cached:.1f}x faster than open_clip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
