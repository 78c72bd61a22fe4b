"""Replicas the gateway routes to. Ray lives only in this package."""
