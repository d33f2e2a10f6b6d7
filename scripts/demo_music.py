#!/usr/bin/env python
"""The music part of scripts/demo.sh, through the `grym` Python client (the CLI's music flags come separately):
render pieces of the self-made MIDI test set with fluidsynth, analyse them, print tempo, key, instruments and the
first notes beside the truth from the MIDI, write the transcribed notes back as MIDI, describe one in words, and
search the stored patterns by a description.

    python scripts/demo_music.py OUT_DIR [--target host:port]
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_music_testset as testset  # noqa: E402

from grym import Client  # noqa: E402
from grym.v1 import common_pb2, orchestrator_pb2 as pb  # noqa: E402

PIECES = {1: "guitar with drums", 7: "solo guitar", 12: "piano with drums"}


def notes_to_midi(notes, path: Path) -> None:  # type: ignore[no-untyped-def]
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    inst.notes = [pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.start_seconds, end=n.end_seconds)
                  for n in notes]
    pm.instruments.append(inst)
    pm.write(str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--target", default=os.environ.get("GRYM_TARGET", "127.0.0.1:50051"))
    args = ap.parse_args(argv)
    truths = {int(p.name[:3]): testset.load(p) for p in testset.make(args.out, 24, only=set(PIECES))}
    names: dict[str, str] = {}  # pattern id -> render
    # this run's patterns only: the demo's store keeps those of earlier runs
    mine = {"kind": "music-demo", "run": uuid.uuid4().hex[:12]}
    with Client(args.target, timeout_s=300) as client:
        for index, what in PIECES.items():
            truth = truths[index]
            res = client.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(
                audio=common_pb2.AudioInput(wav=Path(truth["wav"]).read_bytes()), store=True,
                tags=mine, music_detail=common_pb2.MUSIC_DETAIL_FULL), timeout=300)
            m = res.music
            names[res.pattern_id] = f"{Path(truth['wav']).name} ({what})"
            print(f"\n== {Path(truth['wav']).name} ({what})")
            print(f"   tempo      {m.tempo_bpm:6.1f} BPM (confidence {m.tempo_confidence:.2f})   MIDI: "
                  f"{truth['tempo_bpm']:.0f} BPM")
            print(f"   key        {m.key or 'unknown':10s} (confidence {m.key_confidence:.2f})   MIDI: {truth['key']}")
            print(f"   top tags   {', '.join(f'{t.label} {t.score:.2f}' for t in m.tags[:5]) or '-'}   MIDI: "
                  f"{truth['instrument']}{' + drums' if truth['drums'] else ''}")
            heard = [(n.pitch, round(n.start_seconds, 2)) for n in m.notes[:6]]
            print(f"   first notes {heard}")
            print(f"   MIDI notes  {[(p, round(s, 2)) for p, s, _, _ in truth['notes'][:6]]}")
            midi = Path(truth["wav"]).with_suffix(".transcribed.mid")
            notes_to_midi(m.notes, midi)
            print(f"   {len(m.notes)} transcribed notes written to {midi}")
        caption = client.stub.DescribeAudio(pb.DescribeAudioRequest(
            audio=common_pb2.AudioInput(wav=Path(truths[1]["wav"]).read_bytes())), timeout=300)
        print(f"\n== DescribeAudio: \"{caption.caption}\" (by {caption.describer})")
        for text in ("guitar with drums", "piano"):
            found = client.stub.SearchPatterns(pb.SearchPatternsRequest(
                text=text, top_k=3, tag_filter=mine), timeout=60)
            print(f"== SearchPatterns text={text!r}:")
            for match in found.matches:
                p = match.pattern
                print(f"   {match.score:.2f}  {p.pattern_id}  {p.music.key}, {p.music.tempo_bpm:.0f} BPM, "
                      f"{', '.join(t.label for t in p.music.tags[:3])}")
        anchor = next(pid for pid, name in names.items() if name.startswith(Path(truths[7]["wav"]).name))
        alike = client.stub.SearchPatterns(pb.SearchPatternsRequest(
            pattern_id=anchor, top_k=2, tag_filter=mine), timeout=60)
        print(f"== SearchPatterns sounds like {names[anchor]} (musicnn timbre embedding):")
        for match in alike.matches:
            print(f"   {match.score:.3f}  {names.get(match.pattern.pattern_id, match.pattern.pattern_id)}")
        slow = client.stub.ListPatterns(pb.ListPatternsRequest(tag_filter=mine,
                                                               music_filter=pb.MusicFilter(max_tempo_bpm=115)))
        print(f"== ListPatterns music_filter max_tempo_bpm=115: "
              f"{[(p.music.key, round(p.music.tempo_bpm)) for p in slow.patterns]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
