"""The canonical categories (OpenAI's moderation taxonomy) and the label aliases providers use for them."""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

# Labels seen from OpenAI-compatible providers, normalised (lower case, "_" and "-" and "/" folded) to ours.
_ALIASES: dict[str, str] = {
    "selfharm": "self-harm",
    "harassmentthreatening": "harassment/threatening",
    "hatethreatening": "hate/threatening",
    "illicitviolent": "illicit/violent",
    "selfharmintent": "self-harm/intent",
    "selfharminstructions": "self-harm/instructions",
    "sexualminors": "sexual/minors",
    "violencegraphic": "violence/graphic",
}
_CANONICAL_BY_KEY: dict[str, str] = {c.replace("/", "").replace("-", ""): c for c in CATEGORIES} | _ALIASES


def canonical_category(label: str) -> str | None:
    """Our name for a provider's label, or None when the label is not one of ours."""
    key = label.strip().lower().replace("/", "").replace("-", "").replace("_", "").replace(" ", "")
    return _CANONICAL_BY_KEY.get(key)
