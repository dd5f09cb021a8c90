"""Deployable entrypoints: `deployments/prefect.yaml` and `deployments/serve.py` point here.

A Prefect project keeps the flows it deploys in its own `flows/` folder; this is that folder
for the repository's own pipeline. The flows themselves are part of the installed package
(`wan_tasks.flows`, importable from any project), so this file re-exports them instead of
defining them again: one definition, and an installed `wan-tasks` never shadows a user's own
`flows` package. Add a pipeline's own flows beside it.
"""

from wan_tasks.flows import generate_batch, generate_video

__all__ = ["generate_batch", "generate_video"]
