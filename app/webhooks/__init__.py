"""Webhook mechanics that know nothing of the database: signing, the SSRF guard, the HTTP attempt and the event
payloads. The use cases are app/use_cases/webhook_endpoints.py and app/use_cases/webhook_deliveries.py."""
