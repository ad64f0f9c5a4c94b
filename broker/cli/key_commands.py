"""`optuna-rq keys`: a key per role, written as one file per role, and what each role does with
its file.

The set is written whole or not at all (three temporary files, then renamed), so a failed write
never leaves keys of two sets side by side; an existing set is replaced only with `--force`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import ENV_KEY_FILE, ENV_SECRET, ENV_SECRET_FILE, Role, generate_keyrings

__all__ = ["DEFAULT_KEY_DIR", "key_file_name", "keys", "write_key_set"]

DEFAULT_KEY_DIR = Path("optuna-rq-keys")

# What each role's key signs, and the command line it goes with.
_USES: dict[Role, tuple[str, str]] = {
    Role.BROKER: ("the broker: signs jobs, replies, status and the specs it keeps", "broker"),
    Role.WORKER: (
        "every worker machine: signs results, trial calls and heartbeats",
        "workers --import MODULE",
    ),
    Role.CLIENT: (
        "every front door (the CLI, BrokerClient, a remote Optimizer): signs commands",
        "submit ...",
    ),
}


def key_file_name(role: Role) -> str:
    """The name of `role`'s file in a key directory: broker.key, worker.key, client.key."""
    return f"{role.value}.key"


def keys(
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIRECTORY",
            help="Where to write broker.key, worker.key and client.key (created 0700).",
            show_default=True,
        ),
    ] = DEFAULT_KEY_DIR,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the key set already in DIRECTORY (all three)."),
    ] = False,
) -> None:
    """Make a key per role (Ed25519) and write one file per role, 0600.

    The broker, the workers and the front doors each get their own file: each signs only what
    its role may sign (a worker's key cannot sign a command or a job) and checks the others'
    signatures with the public keys every file carries. Point OPTUNA_RQ_KEY_FILE (or
    --key-file) at a role's file on the machines of that role; copy no file elsewhere.

    For small setups where every machine is trusted alike, one shared secret
    (OPTUNA_RQ_SECRET) still works instead: whoever holds it can sign as any role.
    """
    paths = write_key_set(directory, force=force)
    typer.echo("\n".join(_instructions(directory, paths)))


def write_key_set(directory: Path, *, force: bool = False) -> dict[Role, Path]:
    """Write a fresh set into `directory` (made 0700 if missing), one 0600 file per role; the
    files by role. ConfigError if a key file is there already (unless `force`) or the directory
    cannot be written."""
    paths = {role: directory / key_file_name(role) for role in Role}
    if not force:
        for path in paths.values():
            if path.exists() or path.is_symlink():
                raise ConfigError(
                    f"{str(path)!r} exists: a key set is there already; give --force to "
                    "replace the whole set (every role then needs its new file), or another "
                    "directory"
                )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{str(directory)!r} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {str(directory)!r}: {exc.strerror or exc}") from None
    rings = generate_keyrings()
    written: dict[Role, Path] = {}
    try:
        for role, path in paths.items():
            written[role] = _write_private(
                path.with_name(f".{path.name}.{os.getpid()}.tmp"), rings[role].to_token()
            )
        for role, path in paths.items():
            os.replace(written[role], path)
    except OSError as exc:
        for temporary in written.values():
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise ConfigError(
            f"cannot write the keys into {str(directory)!r}: {exc.strerror or exc}"
        ) from None
    return paths


def _write_private(path: Path, token: str) -> Path:
    """`token` and a newline into a new file only its owner reads (0600 whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _instructions(directory: Path, paths: dict[Role, Path]) -> list[str]:
    lines = [
        f"Wrote a key per role into {str(directory)!r}. Give each file only to the machines",
        f"of its role, named by {ENV_KEY_FILE} (or --key-file):",
        "",
    ]
    for role, path in paths.items():
        who, command = _USES[role]
        lines += [
            f"  {path.name}  {who}",
            f"      {ENV_KEY_FILE}={shlex.quote(str(path.absolute()))} optuna-rq {command}",
        ]
    lines += [
        "",
        "Each file holds its role's private key and every role's public key. Where a key is",
        f"set, set no {ENV_SECRET}. Small setups where every machine is trusted alike may share",
        f"one secret instead ({ENV_SECRET} or {ENV_SECRET_FILE}, 16+ random bytes): whoever",
        "holds it can sign as any role.",
    ]
    return lines
