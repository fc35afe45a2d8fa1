"""`canonical_category`: every spelling providers use for a category maps onto OpenAI's canonical name; anything else
is None (so an unknown label is ignored, never guessed)."""

from __future__ import annotations

import pytest

from app.moderation.taxonomy import CATEGORIES, canonical_category


@pytest.mark.parametrize("category", CATEGORIES)
def test_canonical_names_map_to_themselves(category: str) -> None:
    assert canonical_category(category) == category


@pytest.mark.parametrize(("label", "expected"), [
    ("self_harm", "self-harm"),
    ("self_harm_intent", "self-harm/intent"),
    ("self_harm_instructions", "self-harm/instructions"),
    ("sexual_minors", "sexual/minors"),
    ("harassment_threatening", "harassment/threatening"),
    ("hate_threatening", "hate/threatening"),
    ("illicit_violent", "illicit/violent"),
    ("violence_graphic", "violence/graphic"),
    ("self-harm-intent", "self-harm/intent"),
])
def test_underscore_and_hyphen_forms(label: str, expected: str) -> None:
    assert canonical_category(label) == expected


@pytest.mark.parametrize(("label", "expected"), [
    ("Harassment", "harassment"),
    ("VIOLENCE/GRAPHIC", "violence/graphic"),
    ("Self-Harm/Intent", "self-harm/intent"),
    ("Sexual_Minors", "sexual/minors"),
    ("  hate  ", "hate"),
])
def test_mixed_case_and_surrounding_space(label: str, expected: str) -> None:
    assert canonical_category(label) == expected


@pytest.mark.parametrize("label", ["", "toxicity", "profanity", "violence/extreme", "harass", "sexual/adult", "minors"])
def test_unknown_labels_are_none(label: str) -> None:
    assert canonical_category(label) is None
