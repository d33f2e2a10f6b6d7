"""Pattern memory's filter quoting and id/tag checks, without a store: quote() is proven property-based against
milvus-lite's own filter tokenizer (imported, no server started)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grym_synth.core.errors import InvalidArgument
from grym_synth.memory.store import quote, tag_filter_expr, validate_tags
from grym_synth.workflow.store import check_workflow_id

HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- quoting, proven against milvus-lite's tokenizer -----------------------------------------------------------------
@HYPOTHESIS
@given(st.text(st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from("\t\n\r\"'\\"), max_size=80))
def test_quote_is_one_string_literal_that_parses_back_exactly(value: str) -> None:
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    tokens = tokenize(quote(value))
    assert [t.kind for t in tokens] == [TokenKind.STRING, TokenKind.EOF]
    assert tokens[0].value == value


CONTROL = [chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) not in "\t\n\r"]


@HYPOTHESIS
@given(st.text(max_size=10), st.sampled_from(CONTROL), st.text(max_size=10))
def test_quote_refuses_control_characters(before: str, control: str, after: str) -> None:
    with pytest.raises(InvalidArgument):
        quote(before + control + after)


def test_validation_is_identical_at_store_and_filter_time() -> None:
    for tags in ({"k": "nul\x00"}, {"k": "bell\x07"}, {"k": "nl\n"}, {"k": "c1\x85"}, {"key\n": "v"}, {"k\x00": "v"},
                 {"café": "v"}, {"": "v"}, {"a b": "v"}, {"k" * 65: "v"}, {"k": "v" * 257}):
        with pytest.raises(InvalidArgument) as stored:
            validate_tags(tags)
        with pytest.raises(InvalidArgument) as filtered:
            tag_filter_expr(tags)
        assert str(stored.value).replace("tags", "tag_filter", 1) == str(filtered.value)


def test_workflow_ids_are_checked_by_format() -> None:
    assert check_workflow_id(str(uuid.uuid4()))
    assert check_workflow_id("wf-1") == "wf-1"
    for bad in ["", "x' OR '1'='1", "a\x00b", "a b", "-leading", "x" * 65, "wf-1\n"]:
        with pytest.raises(InvalidArgument):
            check_workflow_id(bad)
