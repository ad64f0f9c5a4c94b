"""What a fresh interpreter imports for the protocol and for `optuna-rq --version` / `--help`.

The protocol is the wire: it builds and checks messages, and needs no Optuna to do so (the
broker builds the sampler). The command line shows its version and its help from the app's
declarations alone: Optuna, Redis and RQ are imported by the commands that use them, when they
run. Each case runs in a subprocess, since a module already imported by this test process would
hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

HEAVY = ("optuna", "redis", "rq", "numpy", "sqlalchemy")
"""What the startup of the protocol and of the command line leaves alone."""

_REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running `code`."""
    done = subprocess.run(
        [sys.executable, "-c", code + _REPORT],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return imported


def _cli(*argv: str) -> str:
    """`code` that runs the command line's entry point with `argv`, as `optuna-rq` does."""
    return (
        "import contextlib, io\n"
        "from optuna_rq.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({list(argv)!r})\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
    )


def test_protocol_imports_no_optuna() -> None:
    assert _imported_after("import optuna_rq.protocol") == []


def test_package_root_imports_nothing_heavy() -> None:
    assert _imported_after("import optuna_rq") == []


def test_package_root_still_offers_its_public_names() -> None:
    code = (
        "import optuna_rq\n"
        "from optuna_rq import Optimizer, optimize, suggest, Float, Integer, Category, Number, "
        "Suggestion, process, BrokerClient, ConfigError, OptunaRQError\n"
        "missing = [n for n in optuna_rq.__all__ if not hasattr(optuna_rq, n)]\n"
        "assert not missing, missing\n"
        "assert set(optuna_rq.__all__) <= set(dir(optuna_rq))\n"
    )
    assert "optuna" in _imported_after(code)  # the Optimizer is Optuna's, once asked for


def test_cli_module_imports_nothing_heavy() -> None:
    assert _imported_after("import optuna_rq.cli.app") == []


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("-h",)])
def test_version_and_help_import_nothing_heavy(argv: tuple[str, ...]) -> None:
    assert _imported_after(_cli(*argv)) == []
