"""Tools for working on medtl, kept out of the installed package (the readers' fuzzer :mod:`tools.fuzz`, the
memory-bomb table :mod:`tools.bombs`, ...). Run them from the repository root: ``python -m tools.NAME``.
"""
