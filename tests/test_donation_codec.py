"""The donation wire format: round trips and every refusal."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from chunkflow.bbox import Bbox
from chunkflow.storage import donation_codec
from chunkflow.storage.donation_codec import (
    MAGIC, DonationError, checksum, decode_donation, encode_donation, read_header,
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


# ---- the checksum's speed-up and the copy-free encode keep the format ------------------------------------------------
#: donations written by chunkflow before libdeflate's CRC and the copy-free encode (issue 11), the
#: C,Z,Y,X array (arange(12) - 5.5) / 4 over 2 channels and box z 0-1, y 0-2, x 8-11
OLD_KEY = "0-16_0-8_0-8%8-11_0-2_0-1"
OLD_FLOAT32 = bytes.fromhex(
    "4346444f4e310ac50000007b226b6579223a22302d31365f302d385f302d3825382d31315f302d325f302d31222c2262626f78223a"
    "22382d31315f302d325f302d31222c227368617065223a5b322c312c322c335d2c226474797065223a22666c6f61743332222c2263"
    "6865636b73756d223a226234363831646231222c226a6f625f68617368223a226a6f62222c22636f6d7072657373696f6e223a226e"
    "6f6e65222c226e62797465735f726177223a34382c226e62797465735f7061796c6f6164223a34387d202020202020202000"
    "00b0bf000090bf000060bf000020bf0000c0be000000be0000003e0000c03e0000203f0000603f0000903f0000b03f")
OLD_FLOAT16_ZSTD = bytes.fromhex(
    "4346444f4e310ac50000007b226b6579223a22302d31365f302d385f302d3825382d31315f302d325f302d31222c2262626f78223a"
    "22382d31315f302d325f302d31222c227368617065223a5b322c312c322c335d2c226474797065223a22666c6f61743136222c2263"
    "6865636b73756d223a223336336432626264222c226a6f625f68617368223a226a6f62222c22636f6d7072657373696f6e223a227a"
    "737464222c226e62797465735f726177223a32342c226e62797465735f7061796c6f6164223a33337d202020202020202028b52f"
    "fd2018c1000080bd80bc00bb00b900b600b0003000360039003b803c803d")


def _old_array() -> np.ndarray:
    return (np.arange(12, dtype=np.float32).reshape(2, 1, 2, 3) - 5.5) / 4


def test_donations_written_before_still_decode_and_are_written_byte_for_byte_the_same():
    box = Bbox.from_name(OLD_KEY.split("%")[1])
    for data, dtype in ((OLD_FLOAT32, np.float32), (OLD_FLOAT16_ZSTD, np.float16)):
        for copy in (True, False):
            header, array = decode_donation(data, OLD_KEY, "job", 2, np.dtype(dtype).name, copy=copy)
            assert array.dtype == dtype and np.array_equal(array, _old_array().astype(dtype))
    assert bytes(encode_donation(_old_array(), box, OLD_KEY, "job")) == OLD_FLOAT32
    broken = bytearray(OLD_FLOAT32)
    broken[-3] ^= 0x40
    assert _refusal(bytes(broken), OLD_KEY, "job") == f"donation {OLD_KEY} is corrupt: checksum mismatch"


@pytest.mark.parametrize("size", [0, 1, 3, 16, 4095, 4096, 65537, 1 << 20])
def test_checksum_is_zlibs_crc32(size):
    data = np.random.default_rng(size).integers(0, 256, size + 7, dtype=np.uint8).tobytes()
    for start in (0, 1, 7):  # unaligned views too
        view = memoryview(data)[start:start + size]
        assert checksum(view) == f"{zlib.crc32(view) & 0xFFFFFFFF:08x}"


def test_a_strided_or_big_endian_piece_encodes_as_its_contiguous_copy(monkeypatch):
    chunk = np.random.default_rng(3).standard_normal((3, 20, 70, 12)).astype(np.float32)
    view = chunk[:, 2:18, 3:67, 4:12]  # PIECE is x 0-8, y 0-64, z 0-16
    assert not view.flags.c_contiguous
    expected = bytes(encode_donation(np.ascontiguousarray(view), PIECE, KEY, JOB))
    assert bytes(encode_donation(view, PIECE, KEY, JOB)) == expected
    assert bytes(encode_donation(view.astype(">f4"), PIECE, KEY, JOB)) == expected
    monkeypatch.setattr(donation_codec, "_crc32", zlib.crc32)  # where libdeflate is not installed
    assert bytes(encode_donation(view, PIECE, KEY, JOB)) == expected
    _, decoded = decode_donation(expected, KEY, JOB, 3, "float32", copy=False)
    np.testing.assert_array_equal(decoded, view)
