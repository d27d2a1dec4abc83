"""The shadow-training pipeline's ``advface`` subcommand (``train-shadow``), one module per subcommand.

The library's command (:mod:`advface.cli.main`) finds it through the ``advface.commands`` entry-point group
(pyproject.toml).
"""
