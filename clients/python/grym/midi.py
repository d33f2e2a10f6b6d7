"""A minimal Standard MIDI File writer for transcribed notes (``grym analyze --midi out.mid``).

Format 0, one track, 480 ticks per quarter note at 120 BPM, so one second is 960 ticks: note times in seconds map
to ticks without a tempo map. Small enough that the light client needs no MIDI library.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TICKS_PER_QUARTER = 480
TEMPO_US_PER_QUARTER = 500_000  # 120 BPM
TICKS_PER_SECOND = TICKS_PER_QUARTER * 1_000_000 // TEMPO_US_PER_QUARTER


class NoteLike(Protocol):
    pitch: int
    start_seconds: float
    end_seconds: float
    velocity: int


def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def midi_bytes(notes: Iterable[NoteLike], channel: int = 0) -> bytes:
    """The notes as a format-0 MIDI file. Pitch and velocity are clamped to 0-127 / 1-127; a note's end is at
    least one tick after its start; offs sort before ons at the same tick (a repeated pitch re-strikes)."""
    events: list[tuple[int, int, bytes]] = []
    for n in notes:
        pitch = min(max(int(n.pitch), 0), 127)
        velocity = min(max(int(n.velocity), 1), 127)
        start = max(round(n.start_seconds * TICKS_PER_SECOND), 0)
        end = max(round(n.end_seconds * TICKS_PER_SECOND), start + 1)
        events.append((start, 1, bytes([0x90 | channel, pitch, velocity])))
        events.append((end, 0, bytes([0x80 | channel, pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(b"\x00\xff\x51\x03" + TEMPO_US_PER_QUARTER.to_bytes(3, "big"))
    now = 0
    for tick, _, message in events:
        track += _vlq(tick - now) + message
        now = tick
    track += b"\x00\xff\x2f\x00"  # end of track
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def write_midi(path: str | Path, notes: Iterable[NoteLike]) -> int:
    """Write the notes to ``path``; returns the number of notes written."""
    notes = list(notes)
    Path(path).write_bytes(midi_bytes(notes))
    return len(notes)
