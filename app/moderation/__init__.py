"""Moderation: the category taxonomy, the providers that score text, and the policy that turns scores into decisions."""
