"""The ``mailroom`` command and dev mode: the layer that composes the web tier and the worker.

Nothing in ``shared``, ``web`` or ``worker`` imports from here.
"""
