"""Placeholder: filled in by the real pull implementation below."""
KNOWN: dict = {}
