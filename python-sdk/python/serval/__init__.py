"""Serval Python SDK."""
