"""Webhook mechanics that know nothing of the database: signing (`signing`), the SSRF guard (`url_guard`),
the HTTP attempt (`sender`) and the event payloads (`events`). The use cases live in
`app.use_cases.webhook_endpoints` and `app.use_cases.webhook_deliveries`."""
