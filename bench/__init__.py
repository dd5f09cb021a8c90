"""Benchmarks of wan-tasks against the emulator and SeaweedFS: `make bench` (see BENCHMARKS.md).

Each module is runnable on its own (`python -m bench.overhead --quick`) and prints a short table
with a baseline measured in the same run; `bench.run_all` runs them one subprocess each.
"""
