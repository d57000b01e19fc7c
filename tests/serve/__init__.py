"""Server tests. A package, so that its conftest.py does not take the module name `conftest` from
tests/conftest.py, which other test files import from."""
