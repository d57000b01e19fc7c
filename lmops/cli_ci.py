"""`lmops ci generate`: the CI/CD pipeline files of a workspace (lmops/ship/ci.py)."""
