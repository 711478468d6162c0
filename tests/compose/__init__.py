"""Helpers of tests/test_compose.py: images, the compose project and its faults."""
