"""A process work pool with a deployment of `generate-batch` from a checkout, made through the
Prefect API (no `prefect deploy`, no prefect.yaml): for the tests and benchmarks that run
batches on `prefect worker start` processes. Prefect is imported when called, not before (a
caller sets PREFECT_API_URL first)."""

from __future__ import annotations

from pathlib import Path


def deploy_generate_batch(pool: str, name: str, checkout: Path) -> str:
    """Create (or replace) process work pool `pool` and deployment `generate-batch/<name>` on
    it, whose flow runs start in `checkout`; returns the deployment's full name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    from wan_tasks.flows.generate import generate_batch

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=pool,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
        client.create_deployment(
            flow_id=client.create_flow_from_name("generate-batch"),
            name=name,
            work_pool_name=pool,
            entrypoint="flows/generate.py:generate_batch",
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(checkout)}}
            ],
            parameter_openapi_schema=parameter_schema(generate_batch).model_dump_for_openapi(),
            enforce_parameter_schema=True,
        )
    return f"generate-batch/{name}"
