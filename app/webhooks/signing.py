"""How a webhook is signed: Standard Webhooks, by its reference library (`webhook-id`, `webhook-timestamp`,
`webhook-signature` with one `v1,` signature per valid secret; secrets `whsec_…`). See docs/webhooks.md."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix every Standard Webhooks secret carries, not a secret
SECRET_BYTES = 32


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature_header(secrets_: Sequence[str], message_id: str, timestamp: datetime, body: str) -> str:
    """The `webhook-signature` value: one `v1,` signature per secret, the newest first."""
    if not secrets_:
        raise ValueError("at least one secret is needed to sign")
    return " ".join(Webhook(secret).sign(message_id, timestamp, body) for secret in secrets_)


def signed_headers(secrets_: Sequence[str], message_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature_header(secrets_, message_id, timestamp, body),
    }
