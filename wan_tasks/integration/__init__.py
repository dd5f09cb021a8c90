"""The Prefect integration: tasks, the credentials block, global concurrency limits, the
crash-safe lock manager and the per-process clients tasks use. The only layer (with the flows
and the CLI above it) that imports Prefect.
"""
