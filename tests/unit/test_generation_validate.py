"""Generation requests are refused with INVALID_ARGUMENT for everything the audioldm model would refuse, using the
model's own limits (the seeded tiny profile's tokenizer, or a checkpoint directory's configs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from grym_synth.core.errors import InvalidArgument
from grym_synth.generation.service import ModelLimits, load_limits, validate

PROMPT = "warm analog synth pad"


@pytest.fixture(scope="module")
def tiny_limits() -> ModelLimits:
    return load_limits("tiny")


@pytest.mark.parametrize("fields,says", [
    (dict(duration_s=1e-9), "duration_seconds must be in [0.008, 30]"),
    (dict(duration_s=0.0079), "duration_seconds"),
    (dict(duration_s=math.inf), "duration_seconds"),
    (dict(duration_s=math.nan), "duration_seconds"),
    (dict(duration_s=1e300), "duration_seconds"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=-math.inf), "guidance_scale"),
    (dict(prompt="synth " * 100), "prompt is 10"),  # 600 characters but over 64 tokens
    (dict(negative_prompt="noise " * 40), "negative_prompt is"),  # over min(64, projection_dim 32) tokens
    (dict(steps=10**12), "steps"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-1), "seed"),
    (dict(scheduler="warp"), "scheduler"),
    (dict(prompt="\ud800 lone surrogate"), "prompt"),
])
def test_validate_refuses_what_the_model_would(tiny_limits: ModelLimits, fields: dict, says: str) -> None:
    args = dict(prompt=PROMPT, negative_prompt="", duration_s=1.0, steps=2, guidance_scale=None, seed=None,
                scheduler="ddim") | fields
    with pytest.raises(InvalidArgument) as err:
        validate(**args, max_duration_s=30.0, limits=tiny_limits)
    assert says in err.value.message


def test_validate_accepts_the_model_bounds(tiny_limits: ModelLimits) -> None:
    for duration in (tiny_limits.min_duration_s, 30.0):
        assert validate(PROMPT, "", duration, 1, 0.0, 2**63 - 1, "pndm", 30.0, tiny_limits).duration_s == duration
    longest = " ".join(["a"] * (tiny_limits.max_prompt_tokens - 2))  # tokens: <s> + text + </s>
    assert tiny_limits.count_tokens(longest) == tiny_limits.max_prompt_tokens
    validate(longest, "", 1.0, 2, None, None, "ddim", 30.0, tiny_limits)
    # The full profile's minimum (0.04 s) is below 0.04 as a float32; it is still accepted, as by the model.
    full = load_limits("full")
    assert full.min_duration_s == 0.04 and validate(PROMPT, "", 0.04, 2, None, None, "ddim", 30.0, full)


def test_limits_from_a_checkpoint_directory(tmp_path: Path) -> None:
    """--audioldm-weights-dir: the checkpoint's own tokenizer and configs (AudioLDM-S shapes) set the limits."""
    import json

    from grym_synth.inference.export.audioldm_tokenizer import save_tokenizer

    save_tokenizer(tmp_path / "tokenizer", model_max_length=512)
    for name, config in {"vocoder": {"upsample_rates": [5, 4, 2, 2, 2], "sampling_rate": 16000},
                         "vae": {"block_out_channels": [128, 256, 512]},
                         "text_encoder": {"projection_dim": 512}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    limits = load_limits("tiny", None, tmp_path)
    assert (limits.min_duration_s, limits.max_prompt_tokens, limits.max_negative_tokens) == (0.04, 512, 512)
    with pytest.raises(InvalidArgument, match="duration_seconds"):
        validate(PROMPT, "", 0.02, 2, None, None, "ddim", 30.0, limits)  # valid for tiny, not for this checkpoint
