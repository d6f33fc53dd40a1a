"""Token bucket vectors, run against the compiled module and its pure-Python twin."""

import pytest

# (size, refill_s, burst, [(op, n, now, expected)])
VECTORS = [
    (100, 1.0, 0, [("consume", 100, 0.0, True), ("consume", 1, 0.0, False),
                   ("wait", 50, 0.0, 0.5), ("consume", 50, 0.5, True), ("consume", 1, 0.5, False)]),
    (10, 2.0, 5, [("consume", 15, 0.0, True), ("consume", 1, 0.0, False),
                  ("wait", 10, 0.0, 2.0), ("consume", 10, 10.0, True)]),
    (8, 1.0, 0, [("wait", 1000, 0.0, 0.0), ("consume", 8, 0.0, True), ("wait", 1000, 0.0, 1.0)]),
    (1000, 0.5, 0, [("consume", 600, 0.0, True), ("consume", 600, 0.1, True),
                    ("consume", 200, 0.1, False)]),
    (5, 1.0, 0, [("consume", 5, 10.0, True), ("consume", 1, 9.0, False)]),  # clock going back: no refill
]


@pytest.mark.parametrize("size,refill,burst,ops", VECTORS)
def test_vectors(tokenbucket, size, refill, burst, ops):
    b = tokenbucket.TokenBucket(size, refill, 0.0, burst)
    for op, n, now, expected in ops:
        if op == "consume":
            assert b.consume(n, now) is expected, (op, n, now)
        else:
            assert b.wait_time(n, now) == pytest.approx(expected), (op, n, now)


def test_bad_parameters(tokenbucket):
    with pytest.raises(ValueError, match="size > 0"):
        tokenbucket.TokenBucket(0, 1.0, 0.0)
