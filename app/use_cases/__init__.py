"""Use cases: what Verdict does, each one transaction, called by thin views, tasks and CLI commands."""
