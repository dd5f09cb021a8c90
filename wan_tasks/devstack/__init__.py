"""Local services for development, tests, the demo and benchmarks: processes on free ports
stopped through their handles, a Prefect server, PostgreSQL, Redis, SeaweedFS, the emulator,
and the embedded defaults used when nothing is configured. Imports no Prefect (servers are
processes).
"""
