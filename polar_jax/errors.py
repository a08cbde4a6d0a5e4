"""The error type for bad user input: the CLI prints its message and exits non-zero."""


class PolarJaxError(Exception):
    """A problem with what the user gave (a path, a checkpoint, an argument), stated plainly."""
