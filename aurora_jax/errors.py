"""Exceptions that name what the user got wrong; the CLI prints them without a traceback."""


class AuroraError(Exception):
    """Base class for errors caused by input (files, configs, prompts), not by bugs."""


class CheckpointError(AuroraError):
    """A checkpoint on disk is missing, malformed or does not fit the model."""


class ConfigError(AuroraError):
    """A config file or override is invalid."""


class PromptError(AuroraError):
    """A prompt cannot be served (too long, empty)."""


class DraftRefused(AuroraError):
    """A draft of the right layout that must not serve: non-finite, zeroed, or stale."""


class SwapError(AuroraError):
    """A hot swap that did not take: the engine still serves the old draft."""
