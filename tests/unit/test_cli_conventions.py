"""The CLI's conventions (``harness --help`` states them): ``--version``; ``--json`` is JSON
on stdout and ``--out FILE`` a file; exit 0 ok, 1 a check failed, 2 usage, configuration or
environment error in one line without a traceback, 130 interrupted, 70 an internal error
(with its traceback); listing and diagnostic commands fetch nothing."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.errors import ConfigError

CLI = [sys.executable, "-m", "harness"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # a fresh user's environment: no run registry another test of this worker registered
    base = {k: v for k, v in os.environ.items() if k != "HARNESS_REGISTRY"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**base, **(env or {})}, cwd=cwd)  # fmt: skip


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("harness ") and res.stdout.split()[1][0].isdigit()


def test_help_states_the_conventions() -> None:
    out = run("--help").stdout
    for words in ("--json", "--out FILE", "130 interrupted", "2 usage", "install-qemu-machine"):
        assert words in out, words


def test_usage_error_is_exit_2() -> None:
    res = run("repro", "no-such-scenario")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_configuration_error_is_one_line_exit_2() -> None:
    res = run("repro", "cpr-reboot", "--cycles", "0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["harness repro: error: --cycles 0: expected a positive number"]


def test_a_missing_file_is_one_line_exit_2(tmp_path: Path) -> None:
    res = run("varstore", "show", str(tmp_path / "absent.fd"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "absent.fd" in res.stderr


def _with_handler(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setitem(cli._COMMANDS, "provision", handler)


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("bad"), 2), (OSError(28, "No space left on device"), 2),
    (KeyboardInterrupt(), 130), (RuntimeError("a bug"), 70),
])  # fmt: skip
def test_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                    exc: BaseException, code: int) -> None:
    _with_handler(monkeypatch, exc)
    assert cli.main(["provision"]) == code
    err = capsys.readouterr().err
    if code == 70:  # a bug: the traceback says where
        assert "Traceback" in err and "RuntimeError: a bug" in err and "internal error" in err
    else:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["repro", "bisect"])
def test_json_is_a_flag_and_out_takes_the_file(command: str, tmp_path: Path) -> None:
    what = (["--scenario", "cpr-reboot", "--good", "a", "--bad", "b", "--builds", "a", "b"]
            if command == "bisect" else ["cpr-reboot"])  # fmt: skip
    args = cli.build_parser().parse_args([command, *what, "--json", "--out", str(tmp_path / "o.json")])
    assert args.json is True and args.out == tmp_path / "o.json"


def test_write_json_file_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        cli.write_json_file(path, {"x": object.__new__(type("Unserialisable", (), {"__str__": None}))})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o.json"]
    cli.write_json_file(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'


@pytest.mark.parametrize("argv", [["doctor"], ["firmware", "list"], ["nightly", "--list"]])
def test_listings_fetch_nothing_and_name_the_command(tmp_path: Path, argv: list[str]) -> None:
    cache = tmp_path / "cache"  # a fresh machine's: nothing provisioned
    res = run(*argv, env={"HARNESS_CACHE": str(cache)}, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "harness provision" in res.stdout + res.stderr
    assert not cache.exists() or not any(cache.rglob("*")), f"{argv} wrote {sorted(cache.rglob('*'))}"
