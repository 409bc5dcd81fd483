"""Shared building blocks of the transfer-learning pipeline.

Each stage in ``stages/`` is a thin command-line entry point; what they share lives here,
one small module per concern: ``params`` (reading and validating params.yaml), ``atomic``
(writes that never leave half a file), ``download``, ``archive``, ``data``, ``models``,
``devices``, ``training`` and ``evaluation``.
"""
