"""Thin command-line entry points (``main(argv=None)``); the logic lives in ``builder/`` and ``models/``."""
