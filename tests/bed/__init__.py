"""Test bed: private Postfix instances, SMTP sinks and helpers shared by tests and bench/."""
