"""Deployment tests (endpoints, analysis, rollouts, their CLI). A package, so that its conftest.py does
not take the module name `conftest` from tests/conftest.py."""
