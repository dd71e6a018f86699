"""What decoding a streamed reply costs the server's event loop, by the reply's length.

    .venv/bin/python benchmarks/stream_decode.py [--lengths 1000 4000 8000]

`honed serve` turns each sampled token of a stream into text safe to send (`_TextStream`: no half
UTF-8 character, nothing past a stop string) on its event loop, where every other client's request
waits its turn. Before session 24 each token decoded every id of the reply again, so the cost grew
with the square of its length; now it decodes the ids since the last complete text, with that
text's ids as context (vLLM's incremental detokenisation). Both are timed here side by side on the
tiny test tokenizer (a byte-level BPE of 390 tokens, built offline), over the ids of this repo's
README, and each checks that its text is what decoding all the ids at once gives.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 8000])
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from honed.serving.local import _TextStream
    from tiny_model import tiny_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_path(1))

    class Engine:
        def decode(self, ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    class WholeDecode(_TextStream):
        """The stream before session 24: every id decoded again at every token."""

        def add(self, token: int) -> list[tuple[str, str]]:
            if self.stopped:
                return []
            self.ids.append(token)
            text = self.engine.decode(self.ids)
            if text.endswith("\ufffd"):
                return []
            self.text = text
            return self._release(text, len(text) - self.hold)

        def finish(self) -> list[tuple[str, str]]:
            self.text = self.engine.decode(self.ids)
            return [*self._release(self.text, len(self.text)), *self.parser.flush()]

    ids = tokenizer((ROOT / "README.md").read_text() * 20)["input_ids"]
    print(f"{'tokens':>7}  {'whole decode s':>14}  {'incremental s':>13}  {'ratio':>6}  same text")
    for n in args.lengths:
        expected = Engine().decode(ids[:n])
        times, texts = [], []
        for kind in (WholeDecode, _TextStream):
            stream, pieces = kind(Engine(), (), calls=False), []
            started = time.perf_counter()
            for token in ids[:n]:
                pieces += stream.add(token)
            pieces += stream.finish()
            times.append(time.perf_counter() - started)
            texts.append("".join(piece for _, piece in pieces))
        same = all(t.rstrip() == expected.rstrip() for t in texts)
        print(f"{n:>7}  {times[0]:>14.3f}  {times[1]:>13.3f}  {times[0] / times[1]:>5.0f}x  {same}")


if __name__ == "__main__":
    main()
