"""The ``stoker`` console script: the CLI, with a short way for the GitLab executor.

gitlab-runner starts ``stoker gitlab-executor`` for every stage of every job;
that command loads only its own module instead of every command group.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:2] == ["gitlab-executor"]:
        from stoker.ci.gitlab.cli import executor_app

        executor_app(args=sys.argv[2:], prog_name="stoker gitlab-executor")
        return
    if sys.argv[1:2] == ["serve"]:
        from stoker.service import early_signals

        # Before the CLI's imports: a SIGTERM during start-up must still stop cleanly.
        early_signals.catch()
    from stoker.cli import main as cli_main

    cli_main()
