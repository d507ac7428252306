"""gitlab-runner's config.toml edited in place: the user's content kept, written only on change."""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from stoker.ci.gitlab.runner_config import (
    CustomSection,
    RunnerEntry,
    load,
    parse,
    read_entry,
)
from stoker.errors import UsageError

USER_CONFIG = """\
# gitlab-runner's file: a comment at the top
concurrent = 2
check_interval = 0

[session_server]
  session_timeout = 1800

[[runners]]
  name = "theirs"   # the user's own runner: left alone
  url = "https://gitlab.example.com"
  token = "glrt-theirs"
  executor = "shell"

[[runners]]
  # our entry, with the user's additions
  name = "stoker-linux"
  url = "https://gitlab.example.com"
  token = "glrt-old"
  executor = "custom"
  output_limit = 8192
  [runners.cache]
    Type = "s3"
    Shared = true
  [runners.custom]
    run_exec = "/old/stoker"

[[runners]]
  name = "after"
  executor = "docker"
"""


def stoker_entry(**changes: object) -> RunnerEntry:
    def args(stage: str) -> list[str]:
        return ["gitlab-executor", "--pool", "linux", stage]

    entry = RunnerEntry(
        name="stoker-linux",
        url="https://gitlab.example.com",
        token="glrt-new-token-0123",
        builds_dir="/builds",
        cache_dir="/cache",
        shell="bash",
        limit=4,
        custom=CustomSection(
            config_exec="/usr/local/bin/stoker",
            config_args=args("config"),
            prepare_exec="/usr/local/bin/stoker",
            prepare_args=args("prepare"),
            run_exec="/usr/local/bin/stoker",
            run_args=args("run"),
            cleanup_exec="/usr/local/bin/stoker",
            cleanup_args=args("cleanup"),
            prepare_exec_timeout=660,
        ),
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gitlab-runner" / "config.toml"
    path.parent.mkdir()
    path.write_text(USER_CONFIG)
    path.chmod(0o600)
    return path


def test_round_trip_keeps_comments_other_runners_and_the_cache(config_file: Path) -> None:
    config = load(config_file)
    assert config.text() == USER_CONFIG  # parsing alone changes nothing
    assert config.names() == ["theirs", "stoker-linux", "after"]
    assert config.upsert(stoker_entry()) is True
    assert config.save() is True
    text = config_file.read_text()
    for kept in (
        "# gitlab-runner's file: a comment at the top",
        "[session_server]\n  session_timeout = 1800",
        'name = "theirs"   # the user\'s own runner: left alone',
        "# our entry, with the user's additions",
        'name = "after"\n  executor = "docker"',
    ):
        assert kept in text
    # new keys take the indentation of their neighbours (gitlab-runner's style)
    assert '\n  output_limit = 8192\n  builds_dir = "/builds"\n' in text
    assert '\n    run_exec = "/usr/local/bin/stoker"\n    config_exec = ' in text
    document = tomllib.loads(text)  # what gitlab-runner's own TOML parser would read
    theirs, ours, after = document["runners"]
    assert theirs == {
        "name": "theirs",
        "url": "https://gitlab.example.com",
        "token": "glrt-theirs",
        "executor": "shell",
    }
    assert after == {"name": "after", "executor": "docker"}
    assert ours["cache"] == {"Type": "s3", "Shared": True}
    assert ours["output_limit"] == 8192
    assert ours["token"] == "glrt-new-token-0123" and ours["limit"] == 4
    assert ours["request_concurrency"] == 1 and ours["shell"] == "bash"
    assert ours["custom"]["run_exec"] == "/usr/local/bin/stoker"
    assert ours["custom"]["run_args"] == ["gitlab-executor", "--pool", "linux", "run"]
    assert ours["custom"]["prepare_exec_timeout"] == 660
    assert document["concurrent"] == 2
    assert read_entry(ours) == stoker_entry()
    assert load(config_file).get("stoker-linux") == ours


def test_upsert_twice_changes_nothing(config_file: Path) -> None:
    config = load(config_file)
    config.upsert(stoker_entry())
    config.save()
    os.utime(config_file, ns=(1_000_000_000, 1_000_000_000))  # an old, recognisable mtime
    before = config_file.read_bytes()
    again = load(config_file)
    assert again.upsert(stoker_entry()) is False
    assert again.ensure_concurrent(2) is False
    assert again.save() is False
    assert config_file.read_bytes() == before
    assert config_file.stat().st_mtime_ns == 1_000_000_000
    # a changed token changes that one line only
    changed = load(config_file)
    assert changed.upsert(stoker_entry(token="glrt-rotated")) is True
    assert changed.save() is True
    old_lines, new_lines = before.decode().splitlines(), config_file.read_text().splitlines()
    assert [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b] == [
        ('  token = "glrt-new-token-0123"', '  token = "glrt-rotated"')
    ]


def test_a_new_entry_in_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "gitlab-runner" / "config.toml"
    config = load(path)
    assert config.names() == [] and config.entries() == []
    assert config.save() is False and not path.exists()  # nothing to write
    assert config.upsert(stoker_entry(environment=["A=b"])) is True
    assert config.ensure_concurrent(4) is True
    assert config.save() is True
    assert path.stat().st_mode & 0o777 == 0o600  # it holds tokens
    document = tomllib.loads(path.read_text())
    assert path.read_text().startswith('concurrent = 4\n\n[[runners]]\n  name = "stoker-linux"\n')
    assert '\n  [runners.custom]\n    config_exec = "/usr/local/bin/stoker"\n' in path.read_text()
    assert document["runners"][0]["environment"] == ["A=b"]
    assert [e["name"] for e in load(path).entries()] == ["stoker-linux"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]  # no temp file left


def test_owned_keys_are_made_exact(config_file: Path) -> None:
    config = load(config_file)
    config.upsert(stoker_entry(environment=["A=b"]))
    config.save()
    # the same values with other TOML types are rewritten; an emptied environment goes
    text = config_file.read_text().replace("limit = 4", "limit = 4.0")
    config_file.write_text(text)
    config = load(config_file)
    assert config.upsert(stoker_entry()) is True
    entry = config.get("stoker-linux")
    assert entry is not None and entry["limit"] == 4 and isinstance(entry["limit"], int)
    assert "environment" not in entry and entry["output_limit"] == 8192


def test_duplicates_and_inline_custom_tables(tmp_path: Path) -> None:
    config = parse(
        '[[runners]]\nname = "stoker-linux"\ncustom = { run_exec = "/x", extra = 1 }\n'
        '[[runners]]\nname = "stoker-linux"\ntoken = "glrt-stale"\n',
        tmp_path / "c.toml",
    )
    assert config.upsert(stoker_entry()) is True
    assert config.names() == ["stoker-linux"]  # the stale copy went
    document = tomllib.loads(config.text())
    assert document["runners"][0]["custom"]["run_exec"] == "/usr/local/bin/stoker"
    assert document["runners"][0]["custom"]["extra"] == 1


def test_remove(config_file: Path) -> None:
    config = load(config_file)
    assert config.remove("stoker-linux") is True
    assert config.remove("stoker-linux") is False
    assert config.remove("nope") is False
    assert config.save() is True
    assert load(config_file).names() == ["theirs", "after"]
    assert "[runners.cache]" not in config_file.read_text()
    assert "[session_server]" in config_file.read_text()
    # removing the last entries leaves no `runners = []` behind
    config = load(config_file)
    assert config.remove("theirs") and config.remove("after")
    config.save()
    assert "runners" not in tomllib.loads(config_file.read_text())
    assert "runners" not in config_file.read_text()


def test_concurrent_is_raised_never_lowered(config_file: Path, tmp_path: Path) -> None:
    config = load(config_file)
    assert config.ensure_concurrent(1) is False
    assert config.ensure_concurrent(2) is False
    assert config.ensure_concurrent(6) is True
    assert tomllib.loads(config.text())["concurrent"] == 6
    assert config.ensure_concurrent(3) is False
    assert tomllib.loads(config.text())["concurrent"] == 6
    # absent: gitlab-runner's default of 1 counts
    bare = parse('[[runners]]\nname = "x"\n', tmp_path / "bare.toml")
    assert bare.ensure_concurrent(1) is False
    assert bare.ensure_concurrent(3) is True
    assert bare.text().startswith("concurrent = 3\n")
    assert tomllib.loads(bare.text())["runners"] == [{"name": "x"}]


def test_mode_is_0600(config_file: Path) -> None:
    config_file.chmod(0o644)
    config = load(config_file)
    config.upsert(stoker_entry())
    assert config.save() is True
    assert config_file.stat().st_mode & 0o777 == 0o600
    # an unchanged file readable by others is tightened, not rewritten
    config_file.chmod(0o644)
    os.utime(config_file, ns=(2_000_000_000, 2_000_000_000))
    assert load(config_file).save() is False
    assert config_file.stat().st_mode & 0o777 == 0o600
    assert config_file.stat().st_mtime_ns == 2_000_000_000


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("concurrent = 1\n[[runners]\nname = 'x'\n")
    with pytest.raises(UsageError) as refused:
        load(bad)
    assert str(refused.value).startswith(f"{bad}: invalid TOML")
    assert "line 2" in str(refused.value)
    assert refused.value.hint is not None


@pytest.mark.parametrize(
    "text",
    ["runners = 3\n", "[runners]\nname = 'x'\n", "runners = [{ name = 'x' }]\n", "runners = [1]\n"],
)
def test_runners_must_be_an_array_of_tables(tmp_path: Path, text: str) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text(text)
    with pytest.raises(
        UsageError, match=r"'runners' must be an array of tables \(\[\[runners\]\]\)"
    ):
        load(bad)


def test_an_empty_runners_array_is_no_runners(tmp_path: Path) -> None:
    config = parse("concurrent = 1\nrunners = []\n", tmp_path / "c.toml")
    assert config.names() == []
    assert config.upsert(stoker_entry()) is True
    assert [r["name"] for r in tomllib.loads(config.text())["runners"]] == ["stoker-linux"]


def test_read_entry_names_what_is_wrong() -> None:
    good = tomllib.loads(parse_entry_text())["runners"][0]
    assert read_entry(good) == stoker_entry()
    with pytest.raises(UsageError, match=r"runner stoker-linux: no \[runners.custom\] table"):
        read_entry({k: v for k, v in good.items() if k != "custom"})
    with pytest.raises(UsageError, match="runner stoker-linux: token is missing"):
        read_entry({k: v for k, v in good.items() if k != "token"})
    with pytest.raises(UsageError, match=r"custom\.run_args should be a list"):
        read_entry({**good, "custom": {**good["custom"], "run_args": "run"}})
    with pytest.raises(UsageError, match="limit should be a int"):
        read_entry({**good, "limit": True})


def parse_entry_text() -> str:
    config = parse("", Path("config.toml"))
    config.upsert(stoker_entry())
    return config.text()


def test_entries_validate_themselves_and_hide_the_token() -> None:
    with pytest.raises(UsageError, match="limit must be 0"):
        stoker_entry(limit=-1)
    with pytest.raises(UsageError, match="request_concurrency"):
        stoker_entry(request_concurrency=0)
    assert "glrt-new-token-0123" not in repr(stoker_entry())


def test_a_save_elsewhere_compares_with_that_file(config_file: Path, tmp_path: Path) -> None:
    config = load(config_file)
    copy = tmp_path / "copy.toml"
    assert config.save(copy) is True  # the same text, but not yet there
    assert copy.read_text() == USER_CONFIG
    assert config.save(copy) is False
