"""Replay the fuzzer's corpus (tests/fuzz_corpus/: the seeds from protocol/vectors.json and
inputs benchmarks/fuzz_wire.py found interesting) through the same checks it runs: both
frame splitters agree and stay within the frame limit, the codec raises only ProtocolError
and round-trips what it accepts."""

from pathlib import Path

import pytest

from hived import fuzzcheck

CORPUS = Path(__file__).parent / "fuzz_corpus"
FILES = sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []


def test_the_corpus_holds_the_seeds():
    have = {p.read_bytes() for p in FILES}
    assert set(fuzzcheck.seeds()) <= have, "regenerate: python benchmarks/fuzz_wire.py seed tests/fuzz_corpus"


@pytest.mark.parametrize("target", sorted(fuzzcheck.TARGETS))
def test_every_corpus_input_passes_every_check(target):
    check = fuzzcheck.TARGETS[target]
    for path in FILES:
        try:
            check(path.read_bytes())
        except AssertionError as exc:
            raise AssertionError(f"{path.name}: {exc}") from None


def test_the_checks_can_fail():
    """A splitter that lets a frame over the limit through is caught."""
    class Leaky:
        def __init__(self, limit):
            self.limit, self.buffered = limit, 0

        def feed(self, data):
            return [data] if data else []

    with pytest.raises(AssertionError, match="from a decoder limited to 4096"):
        fuzzcheck._split(Leaky, 4096, [b"x" * 5000])
