"""Pattern memory by meaning: the trained tagger's embedding and the music descriptors of each pattern.

Why a companion collection and not a second vector field: milvus-lite (3.2) allows one FLOAT_VECTOR field per
collection, so the music embedding lives in ``<patterns collection>_music``, keyed by the same pattern id, with the
descriptors as filterable scalars (``tempo_bpm``, ``key``, ``music_tags``: the top-5 tagger labels) and the rest of
the description as JSON. This also means an existing store needs no migration: its patterns collection is not
touched, and patterns stored before the music models ran simply have no row here (they are found in the Wav2Vec2
space and never match a music filter).

Every client value reaches a Milvus expression as a validated number or through
:func:`grym_synth.memory.store.quote`; keys are normalised to the spelling the analysis writes ("A# minor").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from grym_synth.core.errors import InvalidArgument

MUSIC_SUFFIX = "_music"   # + the embedding's size: "<patterns>_music408" (a bare "_music" is the 200-d layout)
STORED_TOP_TAGS = 5     # labels kept in the filterable `music_tags` array (MusicFilter.tags: "among its top tags")
MAX_FILTER_TAGS = 16
MAX_LABEL_CHARS = 64
MAX_TEMPO_BPM = 1000.0
MAX_TEXT_CHARS = 1000
KEY_CHARS = 16

PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_FLATS = {"DB": "C#", "EB": "D#", "GB": "F#", "AB": "G#", "BB": "A#", "CB": "B", "FB": "E", "E#": "F", "B#": "C"}
_KEY = re.compile(r"\s*([A-Ga-g])\s*([#b♯♭]?)\s*(major|minor|maj|min|m)?\s*", re.IGNORECASE)

# Words people use -> MagnaTagATune labels (the tagger's vocabulary). A word that is itself a label needs no entry.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "drum": ("drums",), "percussion": ("drums",), "percussive": ("drums", "beats"), "kit": ("drums",),
    "guitars": ("guitar",), "acoustic": ("guitar",), "keys": ("piano",), "keyboard": ("piano",),
    "pianos": ("piano",), "violins": ("violin",), "fiddle": ("violin",), "string": ("strings",),
    "orchestra": ("strings", "classical"), "orchestral": ("strings", "classical"), "flutes": ("flute",),
    "cellos": ("cello",), "harps": ("harp",), "synthesizer": ("synth",), "synths": ("synth",),
    "singer": ("vocal", "singing"), "sung": ("singing",), "sing": ("singing",), "vocalist": ("vocal",),
    "voices": ("voice",), "instrumental": ("no vocals",), "calm": ("quiet", "soft"), "gentle": ("soft",),
    "relaxing": ("soft", "ambient"), "chill": ("ambient", "soft"), "mellow": ("soft", "slow"),
    "energetic": ("fast", "loud"), "upbeat": ("fast",), "quick": ("fast",), "heavy": ("metal", "loud"),
    "edm": ("electronic", "dance"), "electro": ("electronic",), "club": ("dance", "techno"),
    "dark": ("slow", "quiet"), "sad": ("slow", "quiet"), "bright": ("fast",), "baroque": ("harpsichord", "classical"),
    "hindustani": ("indian", "sitar"), "vocals": ("vocals",), "noisy": ("loud",),
}


@dataclass
class MusicFields:
    """What the store keeps of a music description (never notes or beats)."""

    tempo_bpm: float = 0.0
    tempo_confidence: float = 0.0
    key: str = ""
    key_confidence: float = 0.0
    tags: list[tuple[str, float, int]] = field(default_factory=list)   # (label, score, TagCategory value)
    vocal_segments: list[tuple[float, float]] = field(default_factory=list)
    embedding: list[float] | None = None
    models: str = ""
    tag_scores: dict[str, float] = field(default_factory=dict)

    def row(self, pattern_id: str, dim: int) -> dict[str, Any]:
        has = self.embedding is not None and len(self.embedding) == dim
        # A placeholder unit vector where there is no embedding (rows need a vector); `has_embedding` keeps it out
        # of every search.
        vector = list(self.embedding) if has else [1.0] + [0.0] * (dim - 1)
        return {"id": pattern_id, "embedding": vector, "has_embedding": has, "tempo_bpm": float(self.tempo_bpm),
                "key": self.key[:KEY_CHARS],
                "music_tags": [t[0][:MAX_LABEL_CHARS] for t in self.tags[:STORED_TOP_TAGS]],
                "summary": {"tempo_confidence": self.tempo_confidence, "key_confidence": self.key_confidence,
                            "tags": [list(t) for t in self.tags], "vocal_segments": [list(s) for s in
                                                                                     self.vocal_segments],
                            "models": self.models, "tag_scores": self.tag_scores}}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "MusicFields":
        entity = row.get("entity", row)
        s = entity.get("summary") or {}
        emb = entity.get("embedding") if entity.get("has_embedding") else None
        return cls(tempo_bpm=float(entity.get("tempo_bpm") or 0.0),
                   tempo_confidence=float(s.get("tempo_confidence") or 0.0), key=str(entity.get("key") or ""),
                   key_confidence=float(s.get("key_confidence") or 0.0),
                   tags=[(str(t[0]), float(t[1]), int(t[2])) for t in s.get("tags") or []],
                   vocal_segments=[(float(a), float(b)) for a, b in s.get("vocal_segments") or []],
                   embedding=[float(x) for x in emb] if emb is not None else None, models=str(s.get("models") or ""),
                   tag_scores={str(k): float(v) for k, v in (s.get("tag_scores") or {}).items()})


MUSIC_SCALARS = ["id", "has_embedding", "tempo_bpm", "key", "music_tags", "summary"]


def is_music_collection(name: str) -> bool:
    """A companion collection of music descriptors (any embedding size), not a patterns collection."""
    return re.search(re.escape(MUSIC_SUFFIX) + r"\d*$", name) is not None


def descriptors_only(row: Mapping[str, Any], dim: int) -> dict[str, Any]:
    """A companion row moved to an embedding space of ``dim``: its descriptors kept, its embedding (another
    space's) dropped, so :meth:`MusicFields.row` writes the placeholder that keeps it out of every search."""
    return replace(MusicFields.from_row(row), embedding=None).row(str(row["id"]), dim)


def create_music_collection(client: Any, name: str, dim: int) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("has_embedding", DataType.BOOL)
    schema.add_field("tempo_bpm", DataType.DOUBLE)
    schema.add_field("key", DataType.VARCHAR, max_length=KEY_CHARS)
    schema.add_field("music_tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=STORED_TOP_TAGS,
                     max_length=MAX_LABEL_CHARS)
    schema.add_field("summary", DataType.JSON)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)


# --- validation of client values ------------------------------------------------------------------------------------
def normalise_key(text: str, what: str = "music_filter.key") -> str:
    """"a minor", "Bb major", "F#m" -> the analysis's spelling ("A minor", "A# major", "F# minor");
    INVALID_ARGUMENT for anything else."""
    if not isinstance(text, str) or len(text) > 32:
        raise InvalidArgument(f"{what} must be a key such as 'A minor' or 'F# major'")
    m = _KEY.fullmatch(text)
    if not m:
        raise InvalidArgument(f"{what} must be a key such as 'A minor' or 'F# major', got {text[:32]!r}")
    letter, acc, mode = m.group(1).upper(), m.group(2), (m.group(3) or "major")
    acc = {"♯": "#", "♭": "b"}.get(acc, acc)
    name = letter + ("#" if acc == "#" else "B" if acc == "b" else "")
    name = _FLATS.get(name.upper(), name)
    if name not in PITCH_NAMES:
        raise InvalidArgument(f"{what} {text[:32]!r} names no pitch class")
    mode = "minor" if mode.lower() in ("minor", "min", "m") else "major"
    return f"{name} {mode}"


def _check_label(label: object, what: str) -> str:
    if not isinstance(label, str) or not label.strip():
        raise InvalidArgument(f"{what} must be non-empty tagger labels such as 'guitar'")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidArgument(f"{what} has a label of {len(label)} characters; labels are at most {MAX_LABEL_CHARS}")
    for ch in label:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidArgument(f"{what} contains the control character U+{ord(ch):04X}")
    return label.strip().lower()


def _check_tempo(value: float, what: str) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= MAX_TEMPO_BPM:
        raise InvalidArgument(f"music_filter.{what} must be 0-{MAX_TEMPO_BPM:g} BPM (0: no bound), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MusicQuery:
    """A validated grym.v1.MusicFilter."""

    min_tempo_bpm: float = 0.0
    max_tempo_bpm: float = 0.0
    key: str = ""
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, min_tempo: float, max_tempo: float, key: str, tags: Sequence[str]) -> "MusicQuery":
        lo, hi = _check_tempo(min_tempo, "min_tempo_bpm"), _check_tempo(max_tempo, "max_tempo_bpm")
        if lo and hi and lo > hi:
            raise InvalidArgument(f"music_filter.min_tempo_bpm ({lo:g}) is above max_tempo_bpm ({hi:g})")
        if len(tags) > MAX_FILTER_TAGS:
            raise InvalidArgument(f"music_filter.tags has {len(tags)} labels; at most {MAX_FILTER_TAGS}")
        labels = tuple(dict.fromkeys(_check_label(t, "music_filter.tags") for t in tags))
        return cls(lo, hi, normalise_key(key) if key else "", labels)

    def __bool__(self) -> bool:
        return bool(self.min_tempo_bpm or self.max_tempo_bpm or self.key or self.tags)

    def expr(self) -> str:
        """The Milvus expression over the music collection ("" when the filter is empty)."""
        from grym_synth.memory.store import quote

        clauses = []
        if self.min_tempo_bpm or self.max_tempo_bpm:
            clauses.append("tempo_bpm > 0")  # an unknown tempo (0) is in no range
        if self.min_tempo_bpm:
            clauses.append(f"tempo_bpm >= {float(self.min_tempo_bpm)!r}")
        if self.max_tempo_bpm:
            clauses.append(f"tempo_bpm <= {float(self.max_tempo_bpm)!r}")
        if self.key:
            clauses.append(f"key == {quote(self.key)}")
        clauses.extend(f"array_contains(music_tags, {quote(t)})" for t in self.tags)
        return " and ".join(clauses)


def text_to_tags(text: str, vocabulary: Iterable[str]) -> list[str]:
    """Tagger labels named by a description ("dark guitar with drums" -> guitar, drums, slow, quiet), multi-word
    labels first ("no vocals", "new age"), then single words and the synonym table. INVALID_ARGUMENT when the text
    is empty, too long, or names nothing the tagger knows."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("text is required: a description such as 'calm piano' (1-1000 characters)")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    vocab = {v.lower() for v in vocabulary}
    words = re.findall(r"[a-z]+", unicodedata.normalize("NFKC", text).lower())
    joined = " " + " ".join(words) + " "
    found: list[str] = []
    for label in sorted((v for v in vocab if " " in v), key=len, reverse=True):
        if f" {label} " in joined:
            found.append(label)
            joined = joined.replace(f" {label} ", " ")
    for word in joined.split():
        if word in vocab:
            found.append(word)
        else:
            found.extend(t for t in SYNONYMS.get(word, ()) if t in vocab)
    labels = list(dict.fromkeys(found))
    if not labels:
        raise InvalidArgument(f"no word of the text names something the tagger knows; try words such as "
                              f"{', '.join(sorted(vocab)[:8]) or 'guitar, piano, drums'}")
    return labels


def text_score(fields: MusicFields, labels: Sequence[str]) -> float:
    """How well a pattern matches a text query: the mean tagger score of the named labels, in [0, 1]."""
    scores = fields.tag_scores or {t[0]: t[1] for t in fields.tags}
    return float(sum(scores.get(lb, 0.0) for lb in labels) / max(len(labels), 1))


def text_rank(fields: MusicFields, labels: Sequence[str]) -> tuple[int, float]:
    """A pattern's place for a text query: how many of the labels are among its top tags (the ones text search
    and MusicFilter.tags match, :data:`STORED_TOP_TAGS`), then :func:`text_score`; higher is better.

    Why the count first: for "guitar with drums" a piece tagged with both should come before a solo guitar, whose
    one strong label can outweigh two moderate ones in the mean (the demo's solo guitar scored 0.35, the guitar with
    drums 0.34)."""
    top = {t[0] for t in fields.tags[:STORED_TOP_TAGS]}
    return sum(lb in top for lb in dict.fromkeys(labels)), text_score(fields, labels)
