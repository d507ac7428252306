"""The stage scripts handed to ``run_exec``: an imitation of gitlab-runner's bash (stand-in)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .contract import RunnerSettings


def job_variables(job: Mapping[str, Any], runner: RunnerSettings) -> list[dict[str, Any]]:
    """The job's variables and then the runner's ``environment`` (later ones win)."""
    out = [dict(v) for v in job.get("variables") or [] if isinstance(v, Mapping) and "key" in v]
    for item in runner.environment:
        key, _, value = item.partition("=")
        out.append({"key": key, "value": value, "public": True, "masked": False, "file": False})
    return out


def project_slug(job: Mapping[str, Any]) -> str:
    """gitlab-runner's ``ProjectSlug``: the repository URL's path, else ``project-<id>``."""
    url = str((job.get("git_info") or {}).get("repo_url") or "")
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and parts.hostname:
        slug = os.path.normpath(parts.path.removesuffix(".git")).strip("/")
        if slug and slug != "." and ".." not in slug:
            return slug
    return f"project-{(job.get('job_info') or {}).get('project_id', 0)}"


def short_token(token: str) -> str:
    """gitlab-runner's short description of a runner token (prefix skipped, 9 characters)."""
    for prefix in ("glrt-", "glrtr-"):
        if token.startswith(prefix):
            return token[len(prefix) : len(prefix) + 9]
    return token[:8]


def _stage_body(
    stage: str,
    job: Mapping[str, Any],
    variables: Mapping[str, str],
    project_dir: str,
) -> list[str]:
    """The stage's own commands (run in ``: | eval '...'``)."""
    q = shlex.quote
    if stage == "prepare_script":
        return ['echo "Running on $(hostname)..."']
    if stage == "get_sources":
        strategy = variables.get("GIT_STRATEGY", "fetch" if job.get("allow_git_fetch") else "clone")
        if strategy in ("none", "empty"):
            return [
                'echo "Skipping Git repository setup"',
                f"mkdir -p {q(project_dir)}",
                f"cd {q(project_dir)}",
            ]
        git = job.get("git_info") or {}
        sha = str(variables.get("CI_COMMIT_SHA") or git.get("sha") or "")
        ref = str(git.get("ref") or variables.get("CI_COMMIT_REF_NAME") or "")
        lines = [
            "export GIT_TERMINAL_PROMPT=0",
            'echo "Fetching changes..."',
            f"mkdir -p {q(project_dir + '.tmp')}",
        ]
        if strategy == "clone":
            lines.append(f"rm -rf {q(project_dir)}")
        lines += [
            f"if [ -d {q(project_dir + '/.git')} ]; then",
            '  echo "Reinitialized existing Git repository"',
            "else",
            f"  mkdir -p {q(project_dir)}",
            f"  git init -q {q(project_dir)}",
            '  echo "Initialized empty Git repository"',
            "fi",
            f"cd {q(project_dir)}",
            'git remote set-url origin "$CI_REPOSITORY_URL" 2>/dev/null'
            ' || git remote add origin "$CI_REPOSITORY_URL"',
            'echo "Fetching the repository..."',
            "git fetch -q --prune origin '+refs/heads/*:refs/remotes/origin/*'"
            " '+refs/tags/*:refs/tags/*'",
            f"echo {q(f'Checking out {sha[:8]} as detached HEAD (ref is {ref})...')}",
            f"git checkout -f -q {q(sha)}",
            "git clean -ffdx -q",
        ]
        return lines
    if stage in ("restore_cache", "archive_cache", "archive_cache_on_failure"):
        if not job.get("cache"):
            return ['echo "No cache defined: nothing to do"']
        verb = "cache-extractor" if stage == "restore_cache" else "cache-archiver"
        return [
            f"cd {q(project_dir)}",
            "if command -v gitlab-runner >/dev/null; then",
            f"  gitlab-runner {verb} --file ../cache.zip || echo 'WARNING: {verb} failed'",
            "else",
            '  echo "WARNING: gitlab-runner is not in PATH: skipping cache"',
            "fi",
        ]
    if stage in (
        "download_artifacts",
        "upload_artifacts_on_success",
        "upload_artifacts_on_failure",
    ):
        wanted = job.get("dependencies") if stage == "download_artifacts" else job.get("artifacts")
        if not wanted:
            return ['echo "No artifacts defined: nothing to do"']
        verb = "artifacts-downloader" if stage == "download_artifacts" else "artifacts-uploader"
        return [
            f"cd {q(project_dir)}",
            "if command -v gitlab-runner >/dev/null; then",
            f'  gitlab-runner {verb} --url "$CI_SERVER_URL" --token "$CI_JOB_TOKEN"'
            ' --id "$CI_JOB_ID"',
            "else",
            '  echo "WARNING: gitlab-runner is not in PATH: skipping artifacts"',
            "fi",
        ]
    if stage.startswith("step_") or stage == "after_script":
        name = "after_script" if stage == "after_script" else stage.removeprefix("step_")
        step = next((s for s in job.get("steps") or [] if s.get("name") == name), None)
        lines = [f"cd {q(project_dir)}"]
        for line in (step or {}).get("script") or []:
            lines.append(f"echo {q('$ ' + str(line))}")
            lines.append(str(line))
        return lines
    return []


def stage_script(
    stage: str,
    job: Mapping[str, Any],
    runner: RunnerSettings,
    *,
    builds_dir: str,
    project_dir: str,
    extra: Mapping[str, str] = {},
) -> str:
    """The bash script the stand-in gives ``run_exec`` for ``stage`` (see the module doc).

    ``extra`` are predefined variables exported after the job's (``CI_PROJECT_DIR``, ...).
    """
    q = shlex.quote
    tmp_dir = project_dir + ".tmp"
    variables = job_variables(job, runner)
    values = {str(v["key"]): str(v.get("value", "")) for v in variables}
    values.update(extra)
    head = ["#!/usr/bin/env bash", "", "set -eo pipefail", "set +o noclobber", ""]
    body: list[str] = []
    files = [v for v in variables if v.get("file")]
    if stage == "cleanup_file_variables":
        body += [f"rm -f {q(tmp_dir + '/' + str(v['key']))}" for v in files]
        body.append('echo "File variables removed"' if files else 'echo "No file variables"')
    else:
        for v in variables:
            key, value = str(v["key"]), str(v.get("value", ""))
            if not key.replace("_", "a").isalnum():
                continue
            if v.get("file"):
                path = f"{tmp_dir}/{key}"
                body += [
                    f"mkdir -p {q(tmp_dir)}",
                    f"printf '%s' {q(value)} > {q(path)}",
                    f"export {key}={q(path)}",
                ]
            else:
                body.append(f"export {key}={q(value)}")
        body += [f"export {k}={q(v)}" for k, v in extra.items()]
        if "CI_REPOSITORY_URL" not in values:
            repo = str((job.get("git_info") or {}).get("repo_url") or "")
            body.append(f"export CI_REPOSITORY_URL={q(repo)}")
        body += _stage_body(stage, job, values, project_dir)
    return "\n".join([*head, f": | eval {q(chr(10).join(body))}", "exit 0", ""])


# ---------------------------------------------------------------------- one job
