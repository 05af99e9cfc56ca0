"""The regression scenarios as library functions.

A scenario is a function ``(ScenarioOptions) -> ScenarioReport`` registered under a name
with :func:`scenario`.  The CLI's ``harness repro NAME``, the nightly matrix, the pytest
tests and the avocado wrappers all call the same functions.  Each module in this package
registers its scenarios on import.  Listing them (:func:`names`, every ``harness``
command's parser) reads the ``@scenario(...)`` lines from the modules' source instead of
importing them (the modules import the whole harness, paramiko included: most of a second
for each ``harness`` command); :func:`get` imports only the module that declares the name.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import pkgutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError, HarnessError

if TYPE_CHECKING:
    from harness.factory import MachineFactory


def parse_settings(items: Sequence[str]) -> list[tuple[str, str]]:
    """``--set KEY=VALUE`` options (``harness repro``, ``hunt``, ``nightly``) as (key,
    value) pairs, in order."""
    out: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out.append((key.strip(), value))
    return out


def setting_value(text: str) -> str | list[str]:
    """The value of a ``--set KEY=VALUE`` option: a comma makes a list."""
    return [v for v in text.split(",") if v] if "," in text else text


@dataclass
class ScenarioOptions:
    """What the user asked for (``harness repro`` options)."""

    qemu: list[str] = field(default_factory=list)
    ovmf: list[str] = field(default_factory=list)
    cycles: int = 1
    until_fail: bool = False
    mode: str | None = None
    workdir: Path | None = None
    artifacts: Path | None = None
    on_record: Callable[[dict[str, Any]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def flag(self, key: str, default: bool = False) -> bool:
        """The yes/no setting ``--set KEY=...`` (1/true/yes/on or 0/false/no/off); any
        other value is refused, naming it, rather than read as a yes."""
        value = self.extra.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _YES:
            return True
        if text in _NO:
            return False
        raise ConfigError(f"--set {key}={value}: expected one of {', '.join(_YES + _NO)}")


_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


@dataclass
class ScenarioReport:
    """What a scenario run found: one record per cycle or hop, and whether all passed."""

    scenario: str
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    duration_s: float = 0.0
    artifacts: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.records) and all(r.get("ok") or r.get("expected_failure") for r in self.records)

    def add(self, record: dict[str, Any], opts: ScenarioOptions | None = None) -> None:
        self.records.append(record)
        if opts is not None and opts.on_record is not None:
            opts.on_record(record)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "started": self.started,
            "duration_s": round(self.duration_s, 3),
            "records": self.records,
            "notes": self.notes,
            "artifacts": self.artifacts,
        }


def record_error(report: ScenarioReport, op: str, exc: Exception, opts: ScenarioOptions) -> None:
    """Record a scenario that could not run or broke as one failed record (unsupported when
    a build lacks a capability, which is named)."""
    from harness.errors import UnsupportedError

    if isinstance(exc, UnsupportedError):
        report.add({"op": op, "status": "unsupported", "ok": False, "error": str(exc),
                    "capability": exc.capability}, opts)  # fmt: skip
    else:
        report.add({"op": op, "status": "error", "ok": False, "error": str(exc)}, opts)


@dataclass
class Run:
    """A scenario body's verdict for :func:`keeping_artifacts`."""

    failed: bool = False


@contextlib.contextmanager
def keeping_artifacts(report: ScenarioReport, opts: ScenarioOptions, factory: MachineFactory,
                      what: str) -> Iterator[Run]:
    """The body of a scenario run on ``factory``'s guests.  A :class:`HarnessError` (an
    UnsupportedError included) becomes one failed record named ``what``; when the run
    failed (the body sets ``run.failed``, or that error) every guest's artifacts are kept
    under ``opts.artifacts`` and the report names them."""
    run = Run()
    try:
        yield run
    except HarnessError as exc:
        record_error(report, what, exc, opts)
        run.failed = True
    finally:
        if run.failed and opts.artifacts is not None:
            report.artifacts = str(factory.save_artifacts(opts.artifacts))


ScenarioFn = Callable[[ScenarioOptions], ScenarioReport]
_REGISTRY: dict[str, ScenarioFn] = {}
_HELP: dict[str, str] = {}


def scenario(name: str, help: str = "") -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under ``name``."""

    def wrap(fn: ScenarioFn) -> ScenarioFn:
        _REGISTRY[name] = fn
        _HELP[name] = help or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return wrap


def _load() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


@functools.cache
def declared() -> dict[str, tuple[str, str]] | None:
    """Every ``@scenario(NAME, HELP)`` of this package's modules, read from their source:
    name -> (module, one-line help); None when a module's source is not at hand or a
    declaration is not made of literals (module-level string constants count), and then
    the callers import every module instead."""
    out: dict[str, tuple[str, str]] = {}
    for info in pkgutil.iter_modules(__path__):
        path = Path(__path__[0]) / f"{info.name}.py"
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            return None
        consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                  for t in n.targets if isinstance(t, ast.Name)}  # fmt: skip
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) and dec.func.id == "scenario"):
                    continue
                if any(k.arg not in ("name", "help") for k in dec.keywords):
                    return None
                given = {str(k.arg): k.value for k in dec.keywords}
                args = [*dec.args, *(given[n] for n in ("name", "help")[len(dec.args):] if n in given)]
                values = [_literal(a, consts) for a in args]
                strings = [v for v in values if v is not None]
                if not strings or len(strings) != len(values):
                    return None
                help_text = strings[1] if len(strings) > 1 and strings[1] else (ast.get_docstring(node) or "").strip()
                out[strings[0]] = (f"{__name__}.{info.name}", help_text.splitlines()[0] if help_text else "")
    return out


def _literal(node: ast.expr, consts: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    return None


def names() -> dict[str, str]:
    """Every scenario name with its one-line help."""
    found = declared()
    if found is None:
        _load()
        return dict(sorted(_HELP.items()))
    return dict(sorted({**{n: h for n, (_, h) in found.items()}, **_HELP}.items()))


def get(name: str) -> ScenarioFn:
    """The scenario ``name``, importing only the module that declares it."""
    if name not in _REGISTRY:
        found = declared()
        if found is not None and name in found:
            importlib.import_module(found[name][0])
        else:
            _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown scenario {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]
