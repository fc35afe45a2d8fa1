"""Use cases: what Verdict does, in the moderation domain's terms, with no HTTP and no queue. Helpers take a Session
and work in the caller's transaction; the few multi-step commands take a Database (docs/architecture.md)."""
