"""`python -m wan_tasks.cli`: the `wan-video` command without its console script."""

from wan_tasks.cli.main import main

raise SystemExit(main())
