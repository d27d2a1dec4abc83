"""The gRPC layer's ``advface`` subcommands (``serve``, ``keyservice``), one module per subcommand.

The library's command (:mod:`advface.cli.main`) finds them through the ``advface.commands`` entry-point group
(pyproject.toml); grpc is imported only when one of them runs.
"""
