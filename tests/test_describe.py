"""One wording for a refused value, whichever reader refused it (config, assignment, job file,
webhooks)."""

from __future__ import annotations

import datetime

import pytest

from farmnode.describe import describe


@pytest.mark.parametrize(("value", "named"), [
    (None, "null"),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (1.5, "1.5"),
    ("x", "'x'"),
    ("a" * 60, repr("a" * 60)),
    ("a" * 61, repr("a" * 57 + "...")),
    ({"a": 1}, "a mapping"),
    ([1], "a list"),
    ((1,), "a list"),
    ({1}, "a set"),
    (datetime.date(2024, 1, 1), "a date"),
    (b"x", "a bytes"),
])
def test_values_are_named_as_their_author_wrote_them(value: object, named: str) -> None:
    assert describe(value) == named


def test_a_mapping_takes_the_formats_own_word() -> None:
    assert describe({}, "an object") == "an object"
    assert describe([], "an object") == "a list"
