"""Errors a user can act on: every message says what is wrong and, where it can, how to fix it."""


class MergeError(Exception):
    """A merge request that cannot be carried out (bad input, incompatible models, unreadable file)."""


class MergeCancelled(MergeError):
    """The user asked to stop; nothing partial was kept."""
