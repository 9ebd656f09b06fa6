"""Test and smoke-test helpers that ship with the engine (e.g. a tiny random snapshot in the official layout)."""
