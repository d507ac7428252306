"""CI integrations: start a one-job runner inside a microVM made from a runner image.

The images (``github-runner``, ``gitlab-runner``, shipped specs) contain the
runner software and nothing else: no registration, no token.  The registration
material for exactly one job is handed to the guest agent at run time, in the
command's arguments or environment, and disappears with the VM.

* :mod:`~stoker.ci.github`: ``run.sh --jitconfig`` (a just-in-time runner);
* :mod:`~stoker.ci.gitlab`: stoker as GitLab Runner's custom executor (a fresh VM per
  job, the runner token never in a VM) and runner registration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stoker.service.config import ServiceConfig
    from stoker.service.integrations import Integration


def integrations_for(config: ServiceConfig) -> list[Integration]:
    """The CI integrations a ``stoker serve`` configuration asks for."""
    found: list[Integration] = []
    if config.github is not None:
        from stoker.ci.github.integration import GitHubIntegration

        found.append(GitHubIntegration(config.github))
    if config.gitlab is not None:
        from stoker.ci.gitlab.integration import GitLabIntegration

        found.append(GitLabIntegration(config))
    return found
