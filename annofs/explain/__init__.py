"""Explanations: finding signed originals; text and binary diffs."""
