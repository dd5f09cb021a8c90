"""Running the flows as scheduled, worker-executed steps of a larger pipeline.

- `prefect.yaml`: the deployments (`prefect deploy`), their schedules, pool and limits.
- `serve.py`: the same deployments served from one process, for teams without a work pool.
- `pipeline.py`: how other steps compose with them (upstream hand-off, downstream trigger).
- `stack.py`: a complete local stack to try it all (`python -m deployments.stack up`).
- `pool.py`: a process pool and a deployment of generate-batch made through the API, for the
  tests and benchmarks that run batches on workers.
"""
