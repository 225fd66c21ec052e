"""The packed ternary layout: exact round trips, the documented byte layout, <= 1.7 bits/weight."""

from __future__ import annotations

import numpy as np
import pytest

from nativelm.formats.ternary_pack import (
    BLOCK,
    bits_per_weight,
    pack_ternary,
    packed_row_bytes,
    unpack_ternary,
)


@pytest.mark.parametrize("K", [1, 2, 4, 5, 6, 64, 159, 160, 161, 333, 768, 4096])
def test_round_trip(K: int) -> None:
    codes = np.random.default_rng(K).integers(-1, 2, size=(2, 5, K)).astype(np.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == np.uint8 and packed.shape == (2, 5, packed_row_bytes(K))
    np.testing.assert_array_equal(unpack_ternary(packed, K), codes)


def test_byte_layout_is_the_documented_one() -> None:
    """Byte j of a full block holds codes j, j+32, j+64, j+96, j+128 (first = most significant digit)."""
    codes = np.zeros((1, BLOCK), np.int8)
    codes[0, 3] = 1  # digit 0 of byte 3 -> v = 2·81 + 1·(27 + 9 + 3 + 1) = 202
    codes[0, 3 + 128] = -1  # digit 4 of byte 3 -> 202 - 1 = 201
    packed = pack_ternary(codes)
    assert packed[0, 3] == -(-201 * 256 // 243)
    assert (np.delete(packed[0], 3) == 128).all()  # all-zero bytes: v = 121 -> q = 128


def test_tail_block_packs_five_per_byte() -> None:
    K = 160 + 13
    codes = np.zeros((1, K), np.int8)
    codes[0, 160 + 3 * 0 + 2] = 1  # tail of 13 codes in 3 bytes: byte 2 digit 0
    packed = pack_ternary(codes)
    assert packed.shape[-1] == 32 + 3
    assert packed[0, 32 + 2] == -(-202 * 256 // 243)


def test_bits_per_weight_target() -> None:
    assert max(bits_per_weight(K) for K in range(64, 4097)) <= 1.7
    assert bits_per_weight(4096) < 1.61


def test_bad_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="codes must be in"):
        pack_ternary(np.full((1, 8), 2, np.int8))
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_ternary(np.zeros((1, 3), np.uint8), 64)
