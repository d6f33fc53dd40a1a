"""Fuzz the wire: both frame splitters (Cython and pure Python) and the codec, with atheris.

Not part of `make test` (it runs for a long time); the inputs it finds interesting are kept
under tests/fuzz_corpus/ and replayed by tests/test_fuzz_corpus.py on every test run.

    pip install atheris                      # a manylinux wheel: no compiler needed
    python benchmarks/fuzz_wire.py framing-cython -runs=10000000 CORPUS_DIR tests/fuzz_corpus
    python benchmarks/fuzz_wire.py framing-python -runs=10000000 CORPUS_DIR tests/fuzz_corpus
    python benchmarks/fuzz_wire.py codec          -runs=10000000 CORPUS_DIR tests/fuzz_corpus
    python benchmarks/fuzz_wire.py seed DIR       # write the seeds (protocol/vectors.json) into DIR

The first corpus directory named collects new inputs; the others are read. Each run uses
libFuzzer's own limits (-timeout=S per input: no hang; -rss_limit_mb) and checks, per input:
only ProtocolError escapes; a decoder never holds more than one frame (header + limit) and
never returns a body over the limit; the two splitters agree byte for byte (framing-*), and
what the codec accepts it encodes back to a body it decodes the same (codec).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def seed(out: Path) -> int:
    from hived import fuzzcheck

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, data in enumerate(fuzzcheck.seeds()):
        (out / f"seed-{i:03d}").write_bytes(data)
        n += 1
    print(f"{n} seeds written to {out}", file=sys.stderr)
    return 0


TARGETS = ("framing-cython", "framing-python", "codec")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in (*TARGETS, "seed"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "seed":
        return seed(Path(argv[2]))
    try:
        import atheris
    except ImportError:
        print("fuzz_wire: atheris is not installed: pip install atheris (or pip install -e '.[fuzz]')",
              file=sys.stderr)
        return 2
    # Imported under the hook, so the Python code (codec, the pure-Python splitter, the checks)
    # gets coverage feedback; the compiled splitter is exercised, not instrumented.
    with atheris.instrument_imports():
        from hived import fuzzcheck
    atheris.Setup([argv[0], *argv[2:]], fuzzcheck.TARGETS[argv[1]])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
