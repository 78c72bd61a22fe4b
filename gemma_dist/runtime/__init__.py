"""Replicas the gateway routes to. Ray lives only in this package (runtime.replica, runtime.worker)."""


class ReplicaFailure(RuntimeError):
    """A replica broke while serving a request (an actor died, a step hung past the watchdog)."""
