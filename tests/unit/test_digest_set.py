"""DigestSet: the compact set behind streamed id and duplicate checks."""

from __future__ import annotations

import hashlib
import random

import pytest

from finescope.digest_set import DigestSet


def _d(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def test_behaves_like_a_set_through_growth():
    s, ref = DigestSet(capacity=16), set()
    rng = random.Random(0)
    for _ in range(5000):
        d = _d(rng.randrange(3000))
        assert s.add(d) == (d not in ref)
        ref.add(d)
    assert len(s) == len(ref)
    assert all(_d(i) in s for i in range(3000) if _d(i) in ref)
    assert sum(_d(i) in s for i in range(3000, 6000)) == 0
    assert s.nbytes >= 16 * len(ref) and s.nbytes <= 16 * 4 * len(ref)  # 2-4 slots of 16 bytes per member


def test_the_all_zero_digest_and_bad_sizes():
    s = DigestSet()
    zero = bytes(16)
    assert zero not in s and s.add(zero) and not s.add(zero) and zero in s and len(s) == 1
    assert "not bytes" not in s
    with pytest.raises(ValueError, match="16-byte digests"):
        s.add(b"short")
