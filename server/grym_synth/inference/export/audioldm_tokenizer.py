"""Offline CLAP tokenizer for seeded AudioLDM profiles.

AudioLDM's text encoder (CLAP's RoBERTa branch) uses a byte-level BPE ``RobertaTokenizer``. The real vocabulary
lives on the model hub, which this project never contacts, so seeded profiles train a small byte-level BPE on an
embedded corpus of music/sound-description text and wrap it as a ``RobertaTokenizer(Fast)``. Being byte-level,
it encodes *any* UTF-8 prompt (unknown words fall back to byte tokens), exactly like the real one; only the
merge table is smaller.

The special tokens keep RoBERTa's ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4) because
``ClapTextConfig`` hard-wires ``bos/pad/eos_token_id`` = 0/1/2 and derives position ids from ``pad_token_id``.

Training is deterministic for a fixed corpus and vocabulary size, so every build writes byte-identical
``vocab.json``/``merges.txt`` — the Triton pipeline model and the diffusers reference pipeline load the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

# Music and sound-event descriptions in the style of AudioCaps / MusicCaps captions (written for this project).
_CORPUS: tuple[str, ...] = (
    "A hammer hitting a wooden surface",
    "Techno music with a strong, upbeat tempo and high melodic riffs",
    "A calm ambient pad with slow evolving textures and soft reverb",
    "Jazz trio with upright bass, brushed drums and a warm piano melody",
    "Heavy metal guitar riff with distorted power chords and double kick drums",
    "Lo-fi hip hop beat with vinyl crackle, mellow chords and a lazy swing",
    "Orchestral strings swelling into a dramatic crescendo with timpani rolls",
    "An acoustic guitar strumming folk chords by a crackling campfire",
    "Rain falling on a tin roof while thunder rumbles in the distance",
    "Birds chirping in a forest at dawn with a gentle breeze",
    "A dog barking twice and then a door slamming shut",
    "Deep house groove with a punchy kick, off-beat hi-hats and a rolling bassline",
    "Solo violin playing a sad slow melody in a minor key",
    "Drum and bass with fast breakbeats, a wobbling sub bass and synth stabs",
    "A choir singing sustained harmonies in a large cathedral",
    "Funky slap bass line with tight drums and brass section hits",
    "Cinematic trailer music with booming percussion and rising synth tension",
    "Reggae rhythm guitar skanks over a relaxed one drop beat",
    "Ocean waves crashing on the shore and seagulls calling",
    "A car engine starting, revving and driving away",
    "Electric piano chords with a bossa nova rhythm and light shaker",
    "Chiptune melody with square waves, arpeggios and a bouncing bassline",
    "Ambient drone with field recordings of wind and distant bells",
    "Trap beat with rapid hi-hat rolls, an 808 bass and snappy claps",
    "A flute and harp duet playing a peaceful pastoral tune",
    "Blues guitar bending notes over a shuffle rhythm in twelve bar form",
    "Synthwave track with retro analog synthesizers, gated reverb drums and neon mood",
    "People talking and laughing in a busy restaurant with clinking glasses",
    "A baby crying while a woman speaks softly",
    "Marching band with snare drums, trumpets and tubas playing a march",
    "Minimal techno loop with a dry kick, clicks and a hypnotic filtered stab",
    "Classical piano sonata with fast runs, trills and expressive dynamics",
    "Dubstep drop with heavy wobble bass and half time drums",
    "Gentle lullaby played on a music box with soft bell tones",
    "Bright pop song with catchy vocals, claps and shimmering synth pads",
    "Tabla and sitar improvisation over a sustained tanpura drone",
    "Latin percussion with congas, bongos, timbales and a cowbell groove",
    "A train passing by with a horn blowing and wheels clattering on the tracks",
    "Footsteps on gravel followed by a creaking wooden gate",
    "Epic fantasy soundtrack with horns, choir and pounding war drums",
    "Smooth saxophone solo over soft jazz chords late at night",
    "Fast bluegrass banjo picking with fiddle and upright bass",
    "Glitchy electronic music with granular textures and stuttering beats",
    "Water dripping in a cave with long echoes",
    "An airplane flying overhead with a low rumbling engine",
    "Soulful gospel organ with tambourine and hand claps",
    "Indie rock band with jangly guitars, driving drums and a melodic bass",
    "Kalimba plucking a simple repeating pattern, warm and intimate",
    "Industrial noise with metallic clangs, hisses and a distorted pulse",
    "Bossa nova guitar with soft brushed snare and a gentle female voice",
    "A cat meowing and purring near a ticking clock",
    "Hard rock anthem with a big chorus, crash cymbals and a screaming guitar solo",
    "Meditative singing bowls ringing with long decaying overtones",
    "Fireworks exploding with crackles and whistles over a cheering crowd",
    "Country song with pedal steel guitar, acoustic strumming and a steady beat",
    "Reverse cymbal swell leading into a massive sub drop",
    "Children playing in a schoolyard with a whistle blowing",
    "Afrobeat groove with interlocking guitars, horns and polyrhythmic percussion",
    "Baroque harpsichord piece with ornamented counterpoint",
    "Slow cinematic piano with cello, melancholic and reflective",
    "Upbeat ska with offbeat guitar, walking bass and a trombone melody",
    "Distant thunderstorm with heavy rain and wind gusts",
    "A keyboard typing quickly and a mouse clicking in a quiet office",
    "Ethereal vocal chops with lush reverb over a downtempo beat",
    "Trance anthem with a soaring lead, supersaw chords and a four on the floor kick",
    "Bass guitar, drums, piano, synth, strings, brass, woodwinds, percussion, vocals",
    "loud quiet fast slow bright dark warm cold happy sad energetic relaxing",
    "major minor tempo rhythm melody harmony chord beat bar loop sample",
)


def train_vocab(vocab_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on the embedded corpus; returns (vocab, merges) in RoBERTa's format."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus a few times only scales the pair counts; it keeps rare-but-useful merges above
    # min_frequency without changing the result between runs.
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for idx, special in enumerate(SPECIAL_TOKENS):
        if vocab.get(special) != idx:
            raise RuntimeError(f"special token {special!r} must have id {idx}, got {vocab.get(special)}")
    return vocab, merges  # type: ignore[return-value]


def build_tokenizer(model_max_length: int, vocab_size: int = 1000):
    """A ``RobertaTokenizer`` (tokenizers-backed, i.e. RobertaTokenizerFast) trained offline."""
    from transformers import RobertaTokenizer

    vocab, merges = train_vocab(vocab_size)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tokenizer(target: Path, model_max_length: int, vocab_size: int = 1000) -> Path:
    """Train and ``save_pretrained`` the tokenizer into ``target`` (loadable with from_pretrained(target))."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model_max_length, vocab_size).save_pretrained(str(target))
    return target
