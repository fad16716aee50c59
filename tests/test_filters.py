"""--filter expressions: what they keep, and that a bad one is refused before anything runs."""

from __future__ import annotations

import pytest

from shardkit.digest_index import DigestIndex, digest_of
from shardkit.errors import ConfigError
from shardkit.filters import parse_filter

ROW = {"aesthetic": 5.5, "pwatermark": 0.2, "punsafe": None, "lang": "en", "nsfw": False, "width": 512}


@pytest.mark.parametrize("expression,holds", [
    ("aesthetic >= 5", True),
    ("aesthetic > 5.5", False),
    ("pwatermark < 0.5 and aesthetic >= 5", True),
    ("pwatermark > 0.5 or width == 512", True),
    ("not (width < 256)", True),
    ("lang == 'en' and nsfw == false", True),
    ('lang != "en"', False),
    ("(aesthetic > 6 or pwatermark < 0.3) and not lang == 'de'", True),
    ("-1 < pwatermark", True),
    ("width >= 5e2", True),
    # A missing or null field fails the filter whatever surrounds it.
    ("punsafe < 0.1", False),
    ("not (punsafe < 0.1)", False),
    ("width > 0 or missing > 1", False),
    # Text against a number is not comparable: the filter fails.
    ("lang > 3", False),
])
def test_filter_semantics(expression, holds):
    assert parse_filter(expression).holds(ROW) is holds


def test_filter_names_its_fields_and_reason():
    expression = parse_filter("  aesthetic >= 5 and (lang == 'en' or punsafe < 0.1) ")
    assert expression.fields() == {"aesthetic", "lang", "punsafe"}
    assert expression.reason == "filtered: aesthetic >= 5 and (lang == 'en' or punsafe < 0.1)"


@pytest.mark.parametrize("expression,message", [
    ("", "needs an expression"),
    ("aesthetic", r"expected a comparison \(<, .*\) at the end"),
    ("aesthetic = 5", "cannot read"),
    ("aesthetic >= 5 5", "expected and/or at column 16"),
    ("open('x') > 1", "expected a comparison"),
    ("(a > 1", r"expected '\)'"),
    ("not " * 40 + "a > 1", "nesting deeper than 32"),
    ("a > 1 and " * 200 + "a > 1", "longer than 1000 characters"),
])
def test_bad_filters_are_config_errors(expression, message):
    with pytest.raises(ConfigError, match=message):
        parse_filter(expression)


def test_digest_index_remembers_the_first_index_through_growth():
    index = DigestIndex()
    for i in range(20_000):
        assert index.first_or_add(digest_of(f"record {i}"), i) is None
    assert len(index) == 20_000
    assert index.first_or_add(digest_of("record 17"), 99_999) == 17
    assert index.first(digest_of("record 19999")) == 19_999 and index.first(digest_of("never seen")) is None
