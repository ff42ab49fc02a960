"""Audio made to hurt: files that claim or decode to hours, and a picture. Made with ffmpeg, in milliseconds
to seconds, 20 KB to 150 KB each."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path


def silent_flac(path: Path, hours: int) -> Path:
    """Hours of digital silence in FLAC frames of 65535 samples, each a constant subframe: ~20 KB an hour."""
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
         "-t", str(hours * 3600), "-c:a", "flac", "-frame_size", "65535", str(path)],
        check=True,
    )  # fmt: skip
    return path


def without_total_samples(path: Path) -> Path:
    """FLAC allows 0 total samples in STREAMINFO for 'unknown': then no header states the duration."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO comes first"
    fields = int.from_bytes(data[18:26], "big")  # rate, channels, bits, then 36 bits of total samples
    data[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(data)
    return path


def png_1x1() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\0"))
        + chunk(b"IEND", b"")
    )
