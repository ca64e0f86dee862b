"""Tests of sandbox/: the Kubernetes API server double."""
