"""Reading a free-text request without a model: durations, moods, genres, instruments, tempo, era, a pattern to vary,
a seed; and the AudioLDM prompts built from what was understood (used by the rule-based planner)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from grym_synth.core.text import FILLER
from grym_synth.planning.plan import wrap_seed
from grym_synth.planning.schema import MAX_PROMPT_CHARS, MAX_PROMPT_SUFFIX_CHARS, MAX_STEPS

MOODS = ("calm", "dark", "happy", "sad", "melancholic", "melancholy", "energetic", "uplifting", "dreamy",
         "aggressive", "peaceful", "mysterious", "epic", "chill", "relaxing", "relaxed", "tense", "romantic",
         "playful", "eerie", "warm", "bright", "gloomy", "hopeful", "nostalgic", "driving", "intense", "soft",
         "gentle", "haunting", "joyful", "serene", "moody", "triumphant", "somber", "groovy", "funky", "spooky",
         "heroic", "lush", "minimal")
GENRES = ("drum and bass", "hip hop", "hip-hop", "lo-fi", "lofi", "ambient", "jazz", "techno", "house", "rock",
          "classical", "orchestral", "cinematic", "folk", "blues", "funk", "disco", "synthwave", "trance",
          "dubstep", "reggae", "metal", "pop", "edm", "electronic", "soul", "trap", "chiptune", "bossa nova",
          "country", "gospel", "drone", "idm", "breakbeat", "garage", "soundtrack")
INSTRUMENTS = ("acoustic guitar", "electric guitar", "bass guitar", "electric piano", "double bass", "drum machine",
               "string quartet", "piano", "guitar", "bass", "drums", "synthesizer", "synth", "strings", "violin",
               "viola", "cello", "flute", "saxophone", "sax", "trumpet", "trombone", "organ", "harp", "choir",
               "percussion", "bells", "marimba", "ukulele", "banjo", "clarinet", "oboe", "horns", "harpsichord",
               "kalimba", "sitar", "tabla", "pads", "vocals", "808")
INSTRUMENT_ALIASES = {"synthesizer": "synth", "sax": "saxophone", "melancholy": "melancholic", "hip-hop": "hip hop",
                      "lofi": "lo-fi"}
TEMPO_WORDS: tuple[tuple[str, int], ...] = (
    ("very slow", 60), ("slow", 70), ("mid-tempo", 100), ("midtempo", 100), ("moderate", 100), ("medium tempo", 100),
    ("upbeat", 125), ("very fast", 170), ("fast", 140), ("quick", 140), ("rapid", 160), ("slower", 0),
    ("faster", 0),
)  # 0: relative words ("slower" than the recalled pattern) that name no absolute tempo
STRENGTH_WORDS: tuple[tuple[str, float], ...] = (
    ("exactly", 0.0), ("identical", 0.0), ("the same", 0.0), ("very different", 0.7), ("loosely", 0.7),
    ("wild", 0.7), ("slightly", 0.2), ("subtle", 0.2), ("close to", 0.2), ("a bit", 0.2),
)
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "half a": 0.5, "half an": 0.5}

_UNIT = r"(seconds?|secs?|minutes?|mins?|s|m)"
_DURATION = re.compile(rf"(?<![\w.])(\d+(?:\.\d+)?)\s*-?\s*{_UNIT}\b", re.I)
_WORD_DURATION = re.compile(
    r"\b(half an?|an?|one|two|three|four|five|six|seven|eight|nine|ten)\s*-?\s*(seconds?|secs?|minutes?|mins?)\b",
    re.I)
_CLOCK = re.compile(r"\b(\d{1,2}):([0-5]\d)\b")
_BPM = re.compile(r"\b(\d{2,3})\s*-?\s*bpm\b", re.I)
# Words about structure and dynamics (the planner turns them into sections and curves, not prompt words).
STRUCTURE_WORDS = frozenset({"build", "builds", "building", "buildup", "climax", "finale", "fade", "fades", "fading",
                             "intro", "outro", "verse", "chorus", "bridge", "drop", "breakdown", "crescendo",
                             "piece", "section", "sections", "loud", "quiet", "ending", "swell", "out"})
_DYNAMICS = re.compile(r"\bslow[- ]?build(?:ing)?\b|\bslowly\s+build(?:s|ing)?\b", re.I)
_STEPS = re.compile(r"\b(\d{1,3})\s*(?:denoising\s+|diffusion\s+)?steps?\b", re.I)
_SEED = re.compile(r"\bseed\s*[:=#]?\s*(\d{1,19})\b", re.I)
_LIKE_PATTERN = re.compile(r"\blike\s+pattern\s+#?([A-Za-z0-9][A-Za-z0-9_-]{0,63})", re.I)
# "continue pattern X", "extend pattern X", "a continuation of pattern X": new audio that carries X on.
_CONTINUE_PATTERN = re.compile(
    r"\b(?:continue|extend|continuation\s+of)\s+pattern\s+#?([A-Za-z0-9][A-Za-z0-9_-]{0,63})", re.I)
_LIKE_ID = re.compile(r"\blike\s+#?([A-Za-z0-9][A-Za-z0-9_-]{0,63})", re.I)
_UUIDISH = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$|^[0-9a-f]{8,}$", re.I)
_EXCLUDE = re.compile(r"\b(?:no|without|minus)\s+(?:any\s+)?([a-z0-9-]+(?:\s[a-z]+)?)", re.I)


@dataclass(frozen=True)
class RequestFeatures:
    """What the rule-based planner understood in a request."""

    duration_s: float | None = None
    moods: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()
    instruments: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    tempo_bpm: int | None = None
    tempo_word: str | None = None
    era: str | None = None
    pattern_id: str | None = None
    continues: bool = False  # "continue pattern X": carry X on (a continue step) instead of varying it
    seed: int | None = None
    strength: float | None = None
    steps: int | None = None  # "in 10 denoising steps": a quick draft
    extra_words: tuple[str, ...] = ()

    @property
    def has_content(self) -> bool:
        return bool(self.moods or self.genres or self.instruments or self.tempo_bpm or self.tempo_word or self.era)


def parse_request(text: str, known_ids: Iterable[str] = ()) -> RequestFeatures:
    """Deterministic reading of a free-text request; nothing here calls a model."""
    lowered = text.lower()
    continued = _CONTINUE_PATTERN.search(text)
    pattern_id = continued.group(1) if continued else _find_pattern_id(text, set(known_ids))
    duration, spans = _find_duration(text)
    excluded = _find_excluded(lowered)
    instruments = tuple(i for i in _find_terms(lowered, INSTRUMENTS) if i not in excluded)
    tempo_bpm, tempo_word = _find_tempo(lowered)
    seed_match = _SEED.search(text)
    steps_match = _STEPS.search(text)
    features = RequestFeatures(
        duration_s=duration, moods=_find_terms(lowered, MOODS), genres=_find_terms(lowered, GENRES),
        instruments=instruments, excluded=excluded, tempo_bpm=tempo_bpm, tempo_word=tempo_word, era=_find_era(text),
        pattern_id=pattern_id, continues=continued is not None,
        seed=wrap_seed(int(seed_match.group(1))) if seed_match else None,
        strength=_find_strength(lowered),
        steps=min(max(int(steps_match.group(1)), 1), MAX_STEPS) if steps_match else None,
    )
    return replace(features, extra_words=_extra_words(text, spans, features))


def _find_pattern_id(text: str, known_ids: set[str]) -> str | None:
    if m := _LIKE_PATTERN.search(text):
        return m.group(1)
    for m in _LIKE_ID.finditer(text):
        candidate = m.group(1)
        if candidate in known_ids or _UUIDISH.match(candidate) or (
                re.search(r"\d", candidate) and re.search(r"[-_]", candidate)):
            return candidate
    return None


def _find_duration(text: str) -> tuple[float | None, list[tuple[int, int]]]:
    """Sums every duration mention ("1 minute 30 seconds" = 90 s). "80s"/"1980s" followed by a style word is a
    decade, not a duration."""
    total, spans = 0.0, []
    for m in _DURATION.finditer(text):
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "s" and _is_decade(text, m):
            continue
        total += value * (60 if unit.startswith("m") else 1)
        spans.append(m.span())
    for m in _WORD_DURATION.finditer(text):
        total += NUMBER_WORDS[m.group(1).lower()] * (60 if m.group(2).lower().startswith("m") else 1)
        spans.append(m.span())
    for m in _CLOCK.finditer(text):
        total += int(m.group(1)) * 60 + int(m.group(2))
        spans.append(m.span())
    return (total if spans else None), spans


def _is_decade(text: str, m: re.Match[str]) -> bool:
    """"1980s", "'80s", "the 80s" and "80s synthwave" are eras; "a 30s loop" and a bare "30s" are durations."""
    number = m.group(1)
    if len(number) == 4 and number.endswith("0"):
        return True
    if m.start() > 0 and text[m.start() - 1] in "'’":
        return True
    if len(number) != 2 or not number.endswith("0") or number == "10":
        return False
    before = text[:m.start()].lower().split()[-1:]
    if before in (["a"], ["an"]):
        return False
    if before == ["the"]:
        return True
    following = text[m.end():].lower().lstrip()
    styles = GENRES + MOODS + INSTRUMENTS + ("style", "vibe", "vibes", "sound", "era", "retro", "music")
    return any(following.startswith(word) for word in styles)


def _find_era(text: str) -> str | None:
    for m in _DURATION.finditer(text):
        if m.group(2).lower() == "s" and _is_decade(text, m):
            return f"{m.group(1)[-2:]}s"
    return None


def _find_terms(lowered: str, vocabulary: Sequence[str]) -> tuple[str, ...]:
    """Vocabulary words in order of appearance; longer phrases win over the words inside them."""
    hits: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    for term in sorted(vocabulary, key=len, reverse=True):
        for m in re.finditer(rf"(?<![\w-]){re.escape(term)}(?:s|es)?(?![\w-])", lowered):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            taken.append(m.span())
            hits.append((m.start(), INSTRUMENT_ALIASES.get(term, term)))
    ordered: dict[str, None] = {}
    for _, term in sorted(hits):
        ordered.setdefault(term)
    return tuple(ordered)


def _find_excluded(lowered: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for m in _EXCLUDE.finditer(lowered):
        for term in _find_terms(m.group(1), INSTRUMENTS + ("noise", "voice", "singing")):
            out.setdefault(term)
    return tuple(out)


def _find_tempo(lowered: str) -> tuple[int | None, str | None]:
    lowered = _DYNAMICS.sub(" ", lowered)  # "slow build" is about dynamics, not tempo
    if (m := _BPM.search(lowered)) and 30 <= int(m.group(1)) <= 300:
        return int(m.group(1)), None
    for word, bpm in TEMPO_WORDS:
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", lowered):
            return (bpm or None), word
    return None, None


def _find_strength(lowered: str) -> float | None:
    for word, strength in STRENGTH_WORDS:
        if re.search(rf"\b{re.escape(word)}\b", lowered):
            return strength
    return None


def _extra_words(text: str, spans: Sequence[tuple[int, int]], f: RequestFeatures) -> tuple[str, ...]:
    """Content words the vocabularies did not cover ("rain", "vinyl crackle"), kept for the prompt."""
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + " " + text[end:]
    text = _CONTINUE_PATTERN.sub(" ", _LIKE_PATTERN.sub(" ", text))
    if f.pattern_id:
        text = text.replace(f.pattern_id, " ")
    text = _SEED.sub(" ", _BPM.sub(" ", _STEPS.sub(" ", text)))
    known = set(" ".join(f.moods + f.genres + f.instruments + f.excluded + MOODS + GENRES + INSTRUMENTS).split())
    known |= {w for w, _ in TEMPO_WORDS} | {w for p, _ in STRENGTH_WORDS for w in p.split()} | {"no", "without"}
    known |= STRUCTURE_WORDS
    words = [w for w in re.findall(r"[a-z][a-z'-]*", text.lower())
             if w not in FILLER and w not in known and w.rstrip("s") not in known and len(w) > 2]
    return tuple(dict.fromkeys(words))[:8]


def build_prompt(f: RequestFeatures, request: str) -> str:
    """An AudioLDM prompt from what was understood: "calm, dreamy 80s ambient music with piano and strings, slow
    tempo, rain". With nothing understood the request text itself is the prompt."""
    if not f.has_content:
        return (" ".join(f.extra_words) or "instrumental music")[:MAX_PROMPT_CHARS]
    head = ", ".join(f.moods)
    body = " ".join(((f.era,) if f.era else ()) + f.genres + ("music",))
    prompt = f"{head} {body}".strip()
    if f.instruments:
        names = list(f.instruments)
        prompt += " with " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
    if f.tempo_word:
        prompt += f", {f.tempo_word} tempo"
    elif f.tempo_bpm:
        prompt += f", {f.tempo_bpm} BPM"
    if f.extra_words:
        prompt += ", " + " ".join(f.extra_words)
    return prompt[:MAX_PROMPT_CHARS]


def variation_suffix(f: RequestFeatures) -> str:
    """What a "like pattern X but ..." request adds to the recalled prompt: "slower tempo, strings"."""
    parts = [*f.moods, *((f.era,) if f.era else ()), *f.genres]
    if f.instruments:
        parts.append("with " + " and ".join(f.instruments))
    if f.tempo_word:
        parts.append(f"{f.tempo_word} tempo")
    elif f.tempo_bpm:
        parts.append(f"{f.tempo_bpm} BPM")
    parts.extend(f.extra_words)
    return ", ".join(parts)[:MAX_PROMPT_SUFFIX_CHARS]


def negative_prompt(f: RequestFeatures) -> str:
    return ", ".join(("low quality", "distortion", *f.excluded))

