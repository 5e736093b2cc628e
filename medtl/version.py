"""medtl's version (one place: ``medtl.__version__``, the CLI's ``--version`` and every record a run writes)."""

__version__ = "0.1.0"
