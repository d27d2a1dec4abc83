"""Offline re-encoding: turn an existing database of raw templates into AdvFace-protected ones.

Streaming (bounded memory), resumable (progress committed per chunk), verifiable, with a local and a Ray engine.
Entry point: :func:`advface.reencode.job.run_job` (and ``advface reencode``).
"""
