"""Placeholder: best / predict / report / ui commands (being written)."""

COMMANDS = []
