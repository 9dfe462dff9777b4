"""G.711 mu-law, enough to make and measure real telephone audio in tests."""

from __future__ import annotations

import math

SILENCE = 0xFF  # mu-law code for a zero sample
BYTES_PER_MS = 8


def decode_sample(code: int) -> int:
    code = ~code & 0xFF
    sign, exponent, mantissa = code & 0x80, (code >> 4) & 0x07, code & 0x0F
    sample = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -sample if sign else sample


DECODE = [decode_sample(c) for c in range(256)]
_ABS = [abs(v) for v in DECODE]


def encode_sample(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    sample = min(abs(sample), 32635) + 0x84
    exponent, mask = 7, 0x4000
    while exponent > 0 and not sample & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone(ms: int, hz: float = 440.0, amplitude: int = 8000, phase_ms: int = 0) -> bytes:
    """A sine tone as mu-law bytes: stands in for a voice."""
    count = ms * BYTES_PER_MS
    start = phase_ms * BYTES_PER_MS
    return bytes(
        encode_sample(int(amplitude * math.sin(2 * math.pi * hz * (start + i) / 8000)))
        for i in range(count)
    )


def silence(ms: int) -> bytes:
    return bytes([SILENCE]) * (ms * BYTES_PER_MS)


def energy(frame: bytes) -> float:
    """Mean absolute amplitude of a mu-law frame (0 for silence, thousands for speech)."""
    return sum(_ABS[b] for b in frame) / max(1, len(frame))
