"""Builders the tests share, imported as ``from tests.helpers.<module> import ...``.

Plain functions taking parameters (models, graphs, NumPy references, kernel runners);
shared setup that a test receives as an argument belongs in ``tests/conftest.py`` as a
fixture instead.
"""
