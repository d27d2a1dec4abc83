"""The ``advface`` command line; one module per subcommand."""
