"""Objectives and search spaces a newcomer can run."""
