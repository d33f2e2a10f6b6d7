"""Stored pattern audio: content-addressed WAV files on any fsspec filesystem.

Why content addressing: a pattern's audio is immutable, the same audio may back several patterns (a cached
generation stored twice, the same clip analysed twice), and a name derived from the bytes makes every write
idempotent across replicas: two writers of one clip write the same object. The key is the SHA-256 (hex) of the
*canonical encoding*, 16-bit PCM mono WAV at the stored rate (:func:`grym_synth.core.audio.encode_wav`), so the
hash a client gets in ``Pattern.audio_sha256`` is the hash of the bytes ``GetPatternAudio`` returns as WAV.

Layout: ``<root>/<sha[:2]>/<sha>.wav``. ``root`` is ``<data_dir>/audio`` by default, or any fsspec URL
(``file:///srv/grym/audio``, ``s3://bucket/prefix`` for several replicas sharing one store, ``memory://`` in tests).

Never half-written: on a local filesystem a file is written to a temporary name in the same directory, flushed
and fsynced, then renamed over the final name (atomic on POSIX); on object stores a single PUT is atomic (an object
appears complete or not at all). Every read is verified against its name: a missing file is DATA_LOSS (a pattern
says it has audio the store lost), a file whose bytes do not hash to its name is DATA_LOSS (corrupt), and a store
that cannot be reached is UNAVAILABLE; none of them is INTERNAL.

Which patterns reference which file lives in the pattern's ``metadata`` under :data:`AUDIO_SHA_KEY` (the Milvus
schema is unchanged); the pattern store (memory/store.py) writes the file before the pattern and removes it when
the last pattern referencing it is deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from grym_synth.core.audio import TARGET_RATE_HZ, encode_wav
from grym_synth.core.errors import GrymError, Unavailable

log = logging.getLogger(__name__)

AUDIO_SHA_KEY = "audio_sha256"  # the reserved key of Pattern.metadata that names the pattern's stored audio
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DOWNSTREAM = "audio_store"


class DataLoss(GrymError):
    """Stored data the server promised is missing or corrupt (DATA_LOSS): restore the audio store from a backup."""

    code = grpc.StatusCode.DATA_LOSS


def canonical_wav(samples: np.ndarray, rate: int = TARGET_RATE_HZ) -> tuple[bytes, str]:
    """(16-bit PCM WAV bytes, their SHA-256 hex): the stored form and its name."""
    data = encode_wav(np.asarray(samples, dtype=np.float32).reshape(-1), rate)
    return data, hashlib.sha256(data).hexdigest()


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


class AudioStore:
    """Content-addressed audio files under one fsspec root (see the module docstring)."""

    def __init__(self, url: str | Path) -> None:
        import fsspec

        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = bool({"file", "local"} & set(protocols))
        # Serialises "write file + insert pattern" against "delete pattern + remove unreferenced file" in this
        # process (memory/store.py), so a file is never removed between being written and being referenced.
        self.lock = asyncio.Lock()

    def path(self, sha: str) -> str:
        return f"{self.root}/{sha[:2]}/{sha}.wav"

    def open(self) -> None:
        """Create the root (local stores); called at start-up so a wrong path fails there, not on a request."""
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    # --- writes ---------------------------------------------------------------------------------------------------
    async def put(self, samples: np.ndarray, rate: int = TARGET_RATE_HZ) -> str:
        """Store ``samples`` (mono float) and return their SHA-256; a no-op when that audio is already stored."""
        data, sha = canonical_wav(samples, rate)
        await self._call(self._put_bytes, sha, data)
        return sha

    def _put_bytes(self, sha: str, data: bytes) -> None:
        path = self.path(sha)
        if self._intact(path, len(data)):
            return  # deduplicated: the same bytes are there already
        if self.local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{sha}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def _intact(self, path: str, size: int) -> bool:
        try:
            return bool(self.fs.exists(path)) and int(self.fs.size(path)) == size
        except FileNotFoundError:
            return False

    async def delete(self, sha: str) -> None:
        """Remove the file of ``sha`` if it exists (callers check that no pattern references it)."""
        if is_sha256(sha):
            await self._call(self._delete, sha)

    def _delete(self, sha: str) -> None:
        try:
            self.fs.rm_file(self.path(sha))
        except FileNotFoundError:
            pass

    # --- reads ----------------------------------------------------------------------------------------------------
    async def get(self, sha: str, *, pattern_id: str = "") -> bytes:
        """The stored WAV bytes of ``sha``, verified; DATA_LOSS when missing or corrupt."""
        whose = f" of pattern {pattern_id}" if pattern_id else ""
        if not is_sha256(sha):
            raise DataLoss(f"the audio reference{whose} is damaged ({sha[:80]!r} is not a SHA-256)")
        try:
            data = await self._call(self.fs.cat_file, self.path(sha))
        except FileNotFoundError:
            raise DataLoss(f"the stored audio{whose} (sha256 {sha}) is missing from the audio store; restore it "
                           "from a backup") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise DataLoss(f"the stored audio{whose} (sha256 {sha}) is corrupt: its bytes do not match their hash; "
                           "restore it from a backup")
        return data

    async def exists(self, sha: str) -> bool:
        return is_sha256(sha) and bool(await self._call(self.fs.exists, self.path(sha)))

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Run a blocking filesystem call in a worker thread; an unreachable store is UNAVAILABLE."""
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning("audio store %s failed: %s", self.url, exc)
            raise Unavailable(DOWNSTREAM, f"the audio store cannot be read or written ({exc.strerror or exc})") \
                from exc
