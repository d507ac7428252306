"""GitHub Actions: one-job just-in-time runners in fresh microVMs.

* :mod:`.runner`: start ``run.sh`` for one job in a VM (``stoker runner github``);
* :mod:`.config`: the ``[github]`` table of ``stoker.toml``;
* :mod:`.client`: the REST API client (app JWTs, installation tokens, rate limits);
* :mod:`.webhook`: verified ``workflow_job`` deliveries;
* :mod:`.demand`: queued jobs, from webhooks and from sweeps of the API;
* :mod:`.reconcile`: runners wanted per pool, their records, garbage collection;
* :mod:`.integration`: the above as one piece of ``stoker serve``;
* :mod:`.fake`: a fake GitHub for tests and benchmarks (never used in production).
"""

from stoker.ci.github.runner import (
    MAX_JITCONFIG,
    RUNNER_DIR,
    RUNNER_USER,
    check_jitconfig,
    jit_runner_argv,
    run_jit_runner,
)

__all__ = [
    "MAX_JITCONFIG",
    "RUNNER_DIR",
    "RUNNER_USER",
    "check_jitconfig",
    "jit_runner_argv",
    "run_jit_runner",
]
