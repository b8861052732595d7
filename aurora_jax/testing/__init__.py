"""Harnesses that test the system from outside: the serving soak with fault injection
(soak.py, `scripts/soak.py`)."""
