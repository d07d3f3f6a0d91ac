"""Run storage and operations: the run directory and its lock, the event log, the lifecycle
every command goes through (``session``), stop and pause requests (``control``) and whether a
run that has not ended is alive (``liveness``)."""
