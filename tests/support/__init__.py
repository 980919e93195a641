"""Test support: real services and processes for the integration tests."""
