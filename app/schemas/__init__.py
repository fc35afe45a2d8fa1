"""Every request and response schema of the HTTP API (pydantic v2), one module per resource. They validate what
comes in, shape what goes out, and generate the OpenAPI document; webhook payloads use `submissions.submission_out`
too, so nothing here imports Flask."""
