"""Reliability suites: crash-resume, fault soak, bad input and the secret scan (RELIABILITY.md)."""
