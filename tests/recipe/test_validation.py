"""Recipes that would fail late, or write where they must not, are refused when read (issue 29:
C1 a task named '..', C2 empty or identical answers, C3 seeds no random state takes)."""

from __future__ import annotations

import pytest

from fbnprune.recipe import RecipeError, parse_recipe

BASE = {"model": "m", "tasks": [{"name": "t", "source": "builtin:bbc_news"}]}


def task(**fields):
    return {"tasks": [{"name": "t", "source": "builtin:bbc_news", **fields}]}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (task(name=".."), "must not start with '.'"),
        (task(name=".hidden"), "must not start with '.'"),
        (task(name="x" * 65), "at most 64"),
        (task(choices={"a": " same", "b": " same"}), "have the same answer"),
        (task(choices={"a": " ", "b": " b"}), "is empty"),
        (
            task(
                choices={"a": " a", "b": " b"},
                wordings=[{"name": "w", "template": "{text}", "choices": {"a": "x", "b": "x "}}],
            ),
            "have the same answer",
        ),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"seed": 2**32}, "less than or equal to 4294967295"),
        ({"seed": 1e23}, "seed"),
        ({"heal": {"seed": 2**40}}, "heal.seed"),
    ],
)
def test_refused_when_read(change, words):
    with pytest.raises(RecipeError) as info:
        parse_recipe({**BASE, **change})
    assert words in str(info.value)


def test_the_limits_themselves_are_accepted():
    assert parse_recipe({**BASE, "seed": 2**32 - 1}).seed == 2**32 - 1
    recipe = parse_recipe({**BASE, **task(name="a.b-c_1", choices={"a": " a", "b": " b"})})
    assert recipe.tasks[0].name == "a.b-c_1"
