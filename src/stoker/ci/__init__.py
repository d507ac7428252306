"""CI integrations: start a one-job runner inside a microVM made from a runner image.

The images (``github-runner``, ``gitlab-runner``, shipped specs) contain the
runner software and nothing else: no registration, no token.  The registration
material for exactly one job is handed to the guest agent at run time, in the
command's arguments or environment, and disappears with the VM.

* :mod:`~stoker.ci.github`: ``run.sh --jitconfig`` (a just-in-time runner);
* :mod:`~stoker.ci.gitlab`: ``gitlab-runner run-single`` for one build.
"""
