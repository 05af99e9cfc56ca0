"""The scenario registry lists names without importing the scenario modules (each
``harness`` command builds its parser from that list) and imports one module per ``get``."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from harness import scenarios
from harness.errors import ConfigError


def test_the_source_read_declarations_are_what_the_modules_register() -> None:
    found = scenarios.declared()
    assert found is not None, "a @scenario(...) line is not made of literals: names() imports every module"
    scenarios._load()
    assert {n: h for n, (_, h) in found.items()} == scenarios._HELP
    for name, (module, _) in found.items():
        assert scenarios._REGISTRY[name].__module__ == module, name


def _in_a_fresh_python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(sorted(m for m in sys.modules if m.startswith(('harness.', 'paramiko'))))"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return list(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_listing_imports_no_scenario_module_and_get_imports_one() -> None:
    listed = _in_a_fresh_python("from harness import scenarios\nassert 'nested' in scenarios.names()")
    assert not [m for m in listed if m.startswith(("harness.scenarios.", "harness.migration", "paramiko"))], listed
    got = _in_a_fresh_python("from harness import scenarios\nscenarios.get('cpr-reboot')")
    mods = [m for m in got if m.startswith("harness.scenarios.")]
    assert "harness.scenarios.updates" in mods and "harness.scenarios.nested" not in mods, mods


def test_an_unknown_name_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown scenario 'no-such'; known: .*cpr-reboot"):
        scenarios.get("no-such")


def test_a_declaration_that_is_not_literal_reads_as_unknown() -> None:
    consts = {"NAME": "announce-reset"}
    assert scenarios._literal(ast.parse("NAME", mode="eval").body, consts) == "announce-reset"
    assert scenarios._literal(ast.parse("'x'", mode="eval").body, consts) == "x"
    assert scenarios._literal(ast.parse("f(1)", mode="eval").body, consts) is None
    assert scenarios._literal(ast.parse("OTHER", mode="eval").body, consts) is None
