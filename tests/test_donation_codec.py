"""The donation wire format: round trips and every refusal."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from chunkflow.bbox import Bbox
from chunkflow.storage.donation_codec import (
    MAGIC, DonationError, decode_donation, encode_donation, read_header,
)

PIECE = Bbox.from_name("0-8_0-64_0-16")
KEY = "0-64_0-64_0-16%" + PIECE.name
JOB = "abc123"


def _array(dtype="float32", channels=3):
    rng = np.random.default_rng(7)
    return rng.standard_normal((channels, *PIECE.shape)).astype(dtype)


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(compression, dtype):
    arr = _array(dtype)
    data = encode_donation(arr, PIECE, KEY, JOB, compression=compression)
    assert data.startswith(MAGIC)
    header, out = decode_donation(data, KEY, JOB)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == arr.dtype and out.flags.writeable
    assert header.bbox == PIECE and header.shape == arr.shape and header.compression == compression
    assert header.nbytes_raw == arr.nbytes and header.job_hash == JOB and header.key == KEY
    assert read_header(data) == header


def test_compression_shrinks_smooth_data():
    arr = np.zeros((1, *PIECE.shape), np.float32)
    for c in ("zstd", "blosc"):
        assert len(encode_donation(arr, PIECE, KEY, JOB, compression=c)) < arr.nbytes // 10


def test_header_is_json_with_the_documented_fields():
    data = encode_donation(_array(), PIECE, KEY, JOB)
    (hlen,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + hlen])
    assert {"key", "bbox", "shape", "dtype", "checksum", "job_hash", "compression", "nbytes_raw"} <= set(header)
    assert header["bbox"] == PIECE.name and len(header["checksum"]) == 8


def _refusal(data, key=KEY, job=JOB) -> str:
    with pytest.raises(DonationError) as err:
        decode_donation(data, key, job)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"donation {key} ")
    return msg


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
def test_flipped_payload_byte_is_corrupt(compression):
    data = bytearray(encode_donation(_array(), PIECE, KEY, JOB, compression=compression))
    data[-100] ^= 0xFF
    assert "is corrupt" in _refusal(bytes(data))


def test_checksum_mismatch_message():
    data = bytearray(encode_donation(_array(), PIECE, KEY, JOB))
    data[-1] ^= 0x01
    assert _refusal(bytes(data)) == f"donation {KEY} is corrupt: checksum mismatch"


def test_flipped_header_and_magic_are_corrupt():
    data = encode_donation(_array(), PIECE, KEY, JOB)
    assert "is corrupt" in _refusal(b"X" + data[1:])
    broken = bytearray(data)
    broken[len(MAGIC) + 6] = ord("}")  # inside the JSON header
    assert "is corrupt" in _refusal(bytes(broken))


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("keep", [3, 9, 40, -1])
def test_truncation(compression, keep):
    data = encode_donation(_array(), PIECE, KEY, JOB, compression=compression)
    assert _refusal(data[:keep]) == f"donation {KEY} is truncated"


def test_wrong_key_and_foreign_job():
    data = encode_donation(_array(), PIECE, KEY, JOB)
    other = "0-64_0-64_16-32%0-8_0-64_16-32"
    assert "mislabelled" in _refusal(data, key=other)
    assert _refusal(data, job="def456") == f"donation {KEY} belongs to job {JOB}, not def456"


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_donation(_array()[:, :4], PIECE, KEY, JOB)  # shape vs bbox
    with pytest.raises(ValueError):
        encode_donation(_array().astype(np.float64), PIECE, KEY, JOB)
    with pytest.raises(ValueError):
        encode_donation(_array(), PIECE, KEY, JOB, compression="gzip")


def test_a_self_consistent_donation_of_the_wrong_box_channels_or_dtype_is_refused():
    """Stored under the right key, for the right job, with a header that agrees with its own
    array: still refused, since numpy would broadcast a 1x1x1 piece over the whole region."""
    tiny = Bbox.from_name("0-1_0-1_0-1")
    data = encode_donation(np.full((3, 1, 1, 1), 1000.0, np.float32), tiny, KEY, JOB)
    assert _refusal(data) == f"donation {KEY} is corrupt: header box {tiny.name}, expected {PIECE.name}"
    good = encode_donation(_array(), PIECE, KEY, JOB)
    assert decode_donation(good, KEY, JOB, channels=3, dtype="float32")[1].shape == (3, *PIECE.shape)
    with pytest.raises(DonationError, match="3 channels, the job's model has 1"):
        decode_donation(good, KEY, JOB, channels=1)
    with pytest.raises(DonationError, match="dtype float32, the job donates float16"):
        decode_donation(good, KEY, JOB, dtype="float16")
