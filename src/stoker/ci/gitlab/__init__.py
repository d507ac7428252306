"""GitLab CI: stoker as a GitLab Runner custom executor, and runner registration.

* :mod:`~stoker.ci.gitlab.executor`: ``stoker gitlab-executor config|prepare|run|cleanup``,
  the driver ``gitlab-runner`` calls for every job (the manager and its token
  stay on the host; each job gets a fresh microVM);
* :mod:`~stoker.ci.gitlab.client`: the GitLab REST API (create, verify, delete runners);
* :mod:`~stoker.ci.gitlab.runner_config`: gitlab-runner's ``config.toml``;
* :mod:`~stoker.ci.gitlab.run_single`: the old, explicitly unsafe mode
  (``gitlab-runner run-single`` with the runner token inside the VM);
* :mod:`~stoker.ci.gitlab.fake_gitlab` and :mod:`~stoker.ci.gitlab.stand_in`: a
  **fake** GitLab and a **stand-in** runner manager for tests (neither can exist here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stoker._lazy import lazy_exports

if TYPE_CHECKING:
    from stoker.ci.gitlab.run_single import (
        MAX_TOKEN,
        RUNNER_BINARY,
        RUNNER_USER,
        check_token,
        run_single_argv,
        run_single_job,
    )

__all__ = [
    "MAX_TOKEN",
    "RUNNER_BINARY",
    "RUNNER_USER",
    "check_token",
    "run_single_argv",
    "run_single_job",
]


# Lazily: the executor (started by gitlab-runner for every stage) imports this
# package and must not load the VM runtime that run_single needs.
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "run_single"))
