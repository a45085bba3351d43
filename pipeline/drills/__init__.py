"""Fault drills: real faults injected into real pretraining runs (``jobs/fault_drill.py``, tests/faults)."""
