#!/usr/bin/env python
"""Make the music test set: MIDI pieces with known tempo, key, instrument and notes, rendered by fluidsynth.

Why self-made: analysis is checked against ground truth, and the only ground truth that is free, exact and
reproducible here is a MIDI file we wrote ourselves. Each piece is a short progression in a known key (major or
minor, tonic-heavy so that the key is audible), at a known tempo (60-180 BPM), played by one General MIDI program,
monophonic (a melody) or polyphonic (melody over chords), with or without a drum kit playing on every beat.
It is rendered by fluidsynth with the FluidR3_GM soundfont (Debian ``fluidsynth`` and ``fluid-soundfont-gm``).

Beside each ``<name>.wav`` the script writes ``<name>.mid`` and ``<name>.json`` (the truth: tempo, key, program,
MTT instrument label, drums, polyphony, notes). Pieces are deterministic for a given ``--seed``.

    python scripts/make_music_testset.py --out build/music_testset --count 24
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
RENDER_RATE_HZ = 22050
PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)  # natural minor; the dominant bar raises the 7th (harmonic minor), as minor
HARMONIC_MINOR = (0, 2, 3, 5, 7, 8, 11)  # music does: V is major and leads to the tonic
# Chord roots as scale degrees: I-IV-V-I / i-iv-v-i, cadences that make the tonic unmistakable.
PROGRESSION = (0, 3, 4, 0)

# General MIDI program (0-based) -> the MagnaTagATune label that names it (the one table: the benchmark and the
# tests count an instrument as recognised when this label is among the top-5 tags).
INSTRUMENTS: dict[int, str] = {
    0: "piano",       # Acoustic Grand Piano
    24: "guitar",     # Acoustic Guitar (nylon)
    25: "guitar",     # Acoustic Guitar (steel)
    40: "violin",     # Violin
    48: "strings",    # String Ensemble 1
    73: "flute",      # Flute
    6: "harpsichord",  # Harpsichord
    42: "cello",      # Cello
    46: "harp",       # Orchestral Harp
}
DEFAULT_PROGRAMS = (0, 24, 40, 48, 73, 6)


@dataclass
class Piece:
    """The ground truth of one rendered piece."""

    name: str
    tempo_bpm: float
    key: str
    tonic: int
    mode: str
    program: int
    instrument: str
    drums: bool
    polyphonic: bool
    duration_s: float
    notes: list[tuple[int, float, float, int]]  # (pitch, start_s, end_s, velocity) of the pitched instrument


def key_name(tonic: int, mode: str) -> str:
    return f"{PITCH_NAMES[tonic % 12]} {mode}"


def build_midi(piece: Piece, bars: int, rng: random.Random):  # -> pretty_midi.PrettyMIDI
    """A melody (eighths and quarters on scale tones, beginning and ending on the tonic) over the progression;
    chords (triads, one per bar) when polyphonic; a kick/snare/hat kit on every beat with drums."""
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(initial_tempo=piece.tempo_bpm)
    beat = 60.0 / piece.tempo_bpm
    base_scale = MAJOR_SCALE if piece.mode == "major" else MINOR_SCALE
    inst = pretty_midi.Instrument(program=piece.program)
    base = 60 + piece.tonic if piece.tonic < 6 else 48 + piece.tonic  # melody around C4-F5
    t = 0.0
    for bar in range(bars):
        degree = PROGRESSION[bar % len(PROGRESSION)]
        scale = HARMONIC_MINOR if piece.mode == "minor" and degree == 4 else base_scale
        if piece.polyphonic:
            for k in (0, 2, 4):  # a triad on the degree, an octave below the melody
                step = degree + k
                pitch = base - 12 + scale[step % 7] + 12 * (step // 7)
                inst.notes.append(pretty_midi.Note(velocity=70, pitch=pitch, start=t, end=t + 4 * beat - 0.02))
        pos = 0.0
        while pos < 4.0 - 1e-9:
            dur = rng.choice((0.5, 1.0, 1.0)) if pos + 1.0 <= 4.0 else 4.0 - pos
            if (bar == 0 and pos == 0.0) or (bar == bars - 1 and pos + dur >= 4.0):
                step = 0
            else:
                step = degree + rng.choice((0, 2, 4, 1, 5))  # mostly chord tones
            pitch = base + scale[step % 7] + 12 * (step // 7)
            start = t + pos * beat
            # Notes end a little early: consecutive equal pitches stay separate onsets.
            inst.notes.append(pretty_midi.Note(velocity=rng.randint(85, 105), pitch=pitch, start=start,
                                               end=start + dur * beat * 0.9))
            pos += dur
        t += 4 * beat
    pm.instruments.append(inst)
    if piece.drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True)
        for b in range(bars * 4):
            s = b * beat
            kit.notes.append(pretty_midi.Note(velocity=100, pitch=36 if b % 2 == 0 else 38, start=s, end=s + 0.1))
            kit.notes.append(pretty_midi.Note(velocity=70, pitch=42, start=s, end=s + 0.05))
        pm.instruments.append(kit)
    return pm


def render(midi_path: Path, wav_path: Path, soundfont: Path = SOUNDFONT) -> None:
    """fluidsynth, offline, mono-summed later by the reader; no reverb/chorus so onsets stay sharp."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise SystemExit("fluidsynth is not installed: apt-get install fluidsynth fluid-soundfont-gm")
    if not soundfont.exists():
        raise SystemExit(f"{soundfont} is missing: apt-get install fluid-soundfont-gm")
    subprocess.run([exe, "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.8", "-r", str(RENDER_RATE_HZ),
                    "-F", str(wav_path), str(soundfont), str(midi_path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def plan(count: int, seed: int, programs: tuple[int, ...] = DEFAULT_PROGRAMS, start: int = 0) -> list[dict]:
    """The piece list: keys cycle through all 12 tonics in both modes, tempos spread over 60-180 BPM, programs
    cycle, a third polyphonic, half with drums (seeded, so the set is the same every time). ``start`` skips that
    many pieces: a set made with another start (and seed) has other tempos, melodies and drums, which is how the
    development set that note-creation settings were chosen on stays apart from the benchmark set."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + count):
        out.append(dict(
            tonic=(i * 7) % 12, mode="major" if i % 2 == 0 else "minor",
            tempo_bpm=float(round(60 + (120 * ((i * 0.618034) % 1.0)))),
            program=programs[i % len(programs)], drums=rng.random() < 0.5, polyphonic=i % 3 == 2,
        ))
    return out


def make(out: Path, count: int, seed: int = 7, bars: int = 4, programs: tuple[int, ...] = DEFAULT_PROGRAMS,
         only: set[int] | None = None, start: int = 0) -> list[Path]:
    """Write and render the set (pieces already rendered are kept); returns the JSON truth files."""
    import pretty_midi

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, spec in enumerate(plan(count, seed, programs, start), start):
        if only is not None and i not in only:
            continue
        mode, tonic = spec["mode"], spec["tonic"]
        name = (f"{i:03d}_{PITCH_NAMES[tonic].replace('#', 's')}{mode[:3]}_{int(spec['tempo_bpm'])}bpm_"
                f"p{spec['program']}{'_drums' if spec['drums'] else ''}{'_poly' if spec['polyphonic'] else ''}")
        truth_path = out / f"{name}.json"
        if truth_path.exists() and (out / f"{name}.wav").exists():
            written.append(truth_path)
            continue
        piece = Piece(name=name, tempo_bpm=spec["tempo_bpm"], key=key_name(tonic, mode), tonic=tonic, mode=mode,
                      program=spec["program"], instrument=INSTRUMENTS[spec["program"]], drums=spec["drums"],
                      polyphonic=spec["polyphonic"], duration_s=0.0, notes=[])
        pm = build_midi(piece, bars, random.Random(seed * 1000 + i))
        piece.notes = [(n.pitch, round(n.start, 6), round(n.end, 6), n.velocity)
                       for n in sorted(pm.instruments[0].notes, key=lambda n: (n.start, n.pitch))]
        piece.duration_s = round(pm.get_end_time(), 6)
        pm.write(str(out / f"{name}.mid"))
        render(out / f"{name}.mid", out / f"{name}.wav")
        truth_path.write_text(json.dumps(asdict(piece), indent=1))
        written.append(truth_path)
    return written


def load(truth_path: Path) -> dict:
    """A piece's truth (JSON) with the path of its render."""
    truth = json.loads(truth_path.read_text())
    truth["wav"] = str(truth_path.with_suffix(".wav"))
    return truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/music_testset"))
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--bars", type=int, default=4)
    ap.add_argument("--start", type=int, default=0, help="index of the first piece (another set: --start 100)")
    args = ap.parse_args(argv)
    paths = make(args.out, args.count, args.seed, args.bars, start=args.start)
    print(f"{len(paths)} pieces in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
