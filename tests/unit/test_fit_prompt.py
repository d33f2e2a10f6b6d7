"""Prompts the server writes itself are fitted to the text encoder's limit, at a word boundary."""

from types import SimpleNamespace

from grym_synth.generation.service import ModelLimits, fit_prompt


def _words_tokenizer(text: str) -> SimpleNamespace:
    """One token per word plus the two special tokens, as RoBERTa-style tokenizers count."""
    return SimpleNamespace(input_ids=[0, *text.split(), 2])


LIMITS = ModelLimits(min_duration_s=0.1, max_duration_s=30.0, max_steps=200, max_prompt_tokens=8,
                     max_negative_tokens=5, source="test", tokenizer=_words_tokenizer)


def test_a_prompt_within_the_limit_is_kept() -> None:
    assert fit_prompt("calm piano with rain", limits=LIMITS) == "calm piano with rain"


def test_a_long_prompt_is_cut_at_a_word_to_the_limit() -> None:
    text = "slow ambient build, rain, soft strings, warm pads, distant bells, 90 BPM, in A minor"
    fitted = fit_prompt(text, limits=LIMITS)
    assert text.startswith(fitted) and LIMITS.count_tokens(fitted) <= 8
    assert LIMITS.count_tokens(fit_prompt(text + " more", limits=LIMITS)) == 8  # the longest prefix that fits
    assert not fitted.endswith(",")


def test_negative_prompts_have_their_own_limit() -> None:
    fitted = fit_prompt("noise hiss clicks hum distortion clipping", negative=True, limits=LIMITS)
    assert LIMITS.count_tokens(fitted) <= 5 and fitted == "noise hiss clicks"


def test_empty_and_unlimited_prompts_pass_through() -> None:
    assert fit_prompt("", limits=LIMITS) == ""
    unlimited = ModelLimits(min_duration_s=0.1, max_duration_s=30.0, max_steps=200, max_prompt_tokens=0,
                            max_negative_tokens=0, source="test", tokenizer=_words_tokenizer)
    assert fit_prompt("a b c d e f g h i j k", limits=unlimited) == "a b c d e f g h i j k"
