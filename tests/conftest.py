"""Session fixtures: one tiny-profile model repository, one real tritonserver, one real orchestrator.

Everything is real: ``tritonserver`` from nvidia-pytriton serving the exported ONNX models, milvus-lite, and the
orchestrator as a ``grym-synth serve`` process on loopback. Tests that need a private orchestrator (restart,
SIGTERM, limits) start their own against the shared Triton, which costs about a second.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from grym_synth.inference.export.repository import ALL_MODELS, build_repository  # noqa: E402
from grym_synth.memory.learning import FeedbackStore, open_feedback_store  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402
from support import OrchestratorProcess  # noqa: E402

log = logging.getLogger(__name__)

# The shared Triton serves every model of the product.
TEST_MODELS = list(ALL_MODELS)

# Limits of the shared orchestrator, small enough that tests can cross them cheaply.
MAX_AUDIO_SECONDS = 30
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile of every model, exported once per session."""
    out = tmp_path_factory.mktemp("model_repository") / "tiny"
    build_repository("tiny", out, models=TEST_MODELS, seed=0)
    return out


@pytest.fixture(scope="session")
def triton(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(tiny_repository, tmp_path_factory.mktemp("triton") / "tritonserver.log",
                            startup_timeout_s=300)
    server.start()
    yield server
    server.stop()


def orchestrator_args(triton: EmbeddedTriton, *extra: str) -> list[str]:
    return ["--triton-url", triton.grpc_url, "--profile", "tiny", "--max-audio-seconds", str(MAX_AUDIO_SECONDS),
            "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--grace-period-s", "5", *extra]


@pytest.fixture(scope="session")
def orchestrator(triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    proc = OrchestratorProcess(tmp_path_factory.mktemp("orchestrator"), orchestrator_args(triton)).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def orchestrator_target(orchestrator: OrchestratorProcess) -> str:
    """host:port of the shared orchestrator (used by the non-Python client tests)."""
    return orchestrator.target


@pytest.fixture(scope="session")
def client(orchestrator: OrchestratorProcess) -> Iterator["object"]:
    from grym import Client

    with Client(orchestrator.target, timeout_s=60) as c:
        yield c


@pytest.fixture
def feedback(tmp_path: Path) -> Iterator[FeedbackStore]:
    """A rating store in its own SQLite file (tests of pattern learning and recall)."""
    store = open_feedback_store(f"sqlite://{tmp_path / 'workflows.db'}")
    yield store
    store.close()


@pytest.fixture(scope="session")
def music_renders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """A few pieces of the self-made MIDI test set (scripts/make_music_testset.py), rendered by fluidsynth once per
    session: index -> truth (tempo, key, instrument, notes) with the render's path under "wav"."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_music_testset as ts

    out = tmp_path_factory.mktemp("music_testset")
    wanted = {1, 4, 7, 12, 13, 17}
    return {int(p.name[:3]): ts.load(p) for p in ts.make(out, 24, only=wanted)}
