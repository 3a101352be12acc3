"""Errors that tell the user what to do."""


class DiffmemError(Exception):
    """A problem with the user's input or environment, phrased as what to do about it."""
