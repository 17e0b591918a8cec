"""Shared pytest setup: fixture plugins live in tests/plugins/ (one file per concern)."""
pytest_plugins = [
    "tests.plugins.leaks",
    "tests.plugins.s3",
    "tests.plugins.driver",
    "tests.plugins.cluster",
]
