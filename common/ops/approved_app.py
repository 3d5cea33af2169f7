"""Only the ClientApp its holder approved runs on a deployed client.

A SuperNode runs whatever app the SuperLink ships in the run's FAB (Flower App Bundle), and
every client-side guarantee (privacy budget, sealing, data key) lives in that code. This
module lets the holder of a client pin it to the FAB(s) they audited, by SHA-256:

* ``fedvault fab-hash APP_DIR`` -- the SHA-256 of the FAB that ``flwr run APP_DIR`` and
  ``flwr build`` make from a source tree (:func:`fab_hash`, Flower's own
  ``flwr.cli.build.build_fab_from_disk``: fixed zip dates, sorted paths, so the same tree
  gives the same bytes). This is the hash Flower itself uses for the FAB (``Fab.hash_str``).
* ``fedvault clientapp --approved-fab-hash H ...`` -- the launcher (:func:`run_launcher`)
  that replaces ``flower-superexec`` next to a SuperNode started with
  ``--isolation process`` (in that mode the SuperNode starts no executor of its own; see
  ``flwr/supernode/start_client_internal.py``). Like ``flower-superexec``
  (``flwr/supercore/superexec/run_superexec.py``) it claims the node's tasks from the
  SuperNode's local Runtime API (``AcquireTask``); a ClientApp task whose FAB hash is
  approved is handed to Flower's own ``flwr-clientapp`` process, unchanged (Flower's
  ``AutoExecPlugin`` + ``SubprocessExecutor``); any other task is answered with an error
  reply, and nothing of its FAB is installed, imported or run.

Why the task's ``fab_hash`` is the hash of the code ``flwr-clientapp`` will run: the
SuperNode stores FABs by content hash -- ``NodeState.store_fab``
(``flwr/supercore/corestate/in_memory_corestate.py``) recomputes the SHA-256 of the bytes,
refuses a FAB whose claimed hash differs and keys it by the computed one; the task carries
the run's ``fab_hash`` (``_pull_and_store_message``), and ``PullTaskInput`` serves
``state.get_fab(run.fab_hash)`` (``flwr/supernode/servicer/runtime/runtime_handlers.py``).
Flower installs a FAB under ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>``
and reuses an existing directory of that name, so before the first launch of an approved
hash the launcher removes any directory with that short name it did not install itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from common.config import ConfigError
from common.ops.flower import TASK_POLL_ENV  # SuperExec's task polling; honoured here too

log = logging.getLogger("fedvault.approved_app")

HASH = re.compile(r"[0-9a-f]{64}")
FIX = "audit the app's source, run `fedvault fab-hash <app dir>` on it and approve that hash"


# --------------------------------------------------------------------------------------------
# the hash the holder approves


def fab_bytes(path: Path | str) -> bytes:
    """The FAB of an app directory, built exactly as ``flwr run``/``flwr build`` build it,
    or the bytes of a ``.fab`` file."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.read_bytes()
    if not (p / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{p}: neither a .fab file nor an app directory with pyproject.toml"
        )
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(p)


def fab_hash(path: Path | str) -> str:
    """SHA-256 (hex) of :func:`fab_bytes`: what ``flwr run`` reports as the FAB's hash."""
    return hashlib.sha256(fab_bytes(path)).hexdigest()


def fab_contents(fab: bytes) -> list[tuple[str, str]]:
    """``(path, sha256)`` of every file in a FAB, from its ``.info/CONTENT`` manifest."""
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        manifest = z.read(".info/CONTENT").decode()
    return [(line.split(",")[0], line.split(",")[1]) for line in manifest.splitlines() if line]


def check_hash(value: str) -> str:
    h = value.strip().lower()
    if not HASH.fullmatch(h):
        raise ConfigError(f"{value!r} is not a SHA-256 hash (64 hex digits): {FIX}")
    return h


def read_approved(path: Path | str) -> list[str]:
    """Hashes from an approved-apps file: one per line, ``#`` starts a comment."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    words = (line.split("#", 1)[0].split() for line in lines)
    return [check_hash(w[0]) for w in words if w]


def approved_set(hashes: Iterable[str] = (), files: Iterable[Path | str] = ()) -> frozenset[str]:
    """Every approved hash; refuses an empty list (the node would refuse every run)."""
    approved = {check_hash(h) for h in hashes}
    for f in files:
        approved.update(read_approved(f))
    if not approved:
        raise ConfigError(f"no approved app hash: {FIX} (--approved-fab-hash or the file)")
    return frozenset(approved)


# --------------------------------------------------------------------------------------------
# the launcher


def _runtime_client(address: str, insecure: bool, root_certificates: str | None, token=None):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    component = "SuperExec" if token is None else "flwr-clientapp"
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


class Launcher:
    """One SuperNode's task launcher that runs approved ClientApps only."""

    def __init__(
        self,
        runtime_api_address: str,
        approved: frozenset[str],
        *,
        insecure: bool = True,
        root_certificates: str | None = None,
    ) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor
        from flwr.supercore.superexec.plugin import AutoExecPlugin

        self.address = runtime_api_address
        self.approved = approved
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.client = _runtime_client(runtime_api_address, insecure, root_certificates)
        # Flower's own launch path: exactly what flower-superexec runs for an accepted task.
        self.plugin = AutoExecPlugin(
            runtime_api_address=runtime_api_address,
            insecure=insecure,
            root_certificates_path=root_certificates,
            runtime_dependency_install=False,
            executor=SubprocessExecutor(),
        )
        self._installed: set[str] = set()

    def poll_once(self) -> str | None:
        """Claim one pending task, if any, and launch or refuse it: ``"launched"``,
        ``"refused"`` or ``None`` (nothing pending)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        # Every task type: one this launcher does not run is refused (answered), never left
        # pending -- the SuperNode waits for a reply before it pulls its next message.
        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[t.value for t in TaskType])
        )
        if not (res.HasField("task") and res.token):
            return None
        task = res.task
        if task.type == TaskType.CLIENT_APP and task.fab_hash in self.approved:
            self._launch(task, res.token)
            return "launched"
        self._refuse(task, res.token)
        return "refused"

    def _launch(self, task, token: str) -> None:
        from flwr.supercore.superexec.executor import LaunchResultStatus

        if task.fab_hash not in self._installed:
            self._remove_foreign_install(task.fab_hash)
            self._installed.add(task.fab_hash)
        log.info(
            "run %d: FAB sha256 %s is approved; starting flwr-clientapp (task %d)",
            task.run_id, task.fab_hash, task.task_id,
        )  # fmt: skip
        result = self.plugin.launch_task(token=token, task=task)
        if result.status != LaunchResultStatus.ACCEPTED:
            log.error("run %d: flwr-clientapp did not start: %s", task.run_id, result.message)

    def _remove_foreign_install(self, h: str) -> None:
        """Flower reuses ``apps/<...>.<hash[:8]>`` if it exists: make sure the directory
        the approved app runs from is installed from the approved FAB, not a leftover."""
        from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
        from flwr.supercore.utils import get_flwr_home

        apps = get_flwr_home() / APP_DIR
        for stale in apps.glob(f"*.{h[:FAB_HASH_TRUNCATION]}") if apps.is_dir() else ():
            log.info("removing %s: reinstalled from the approved FAB on first use", stale)
            shutil.rmtree(stale)

    def _refuse(self, task, token: str) -> None:
        """Answer the task with an error reply without installing or loading its FAB."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.constant import TaskType
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        received = task.fab_hash or "(none)"
        what = "ClientApp" if task.type == TaskType.CLIENT_APP else f"{task.type} task"
        log.error(
            "REFUSED %s of run %d: FAB sha256 %s is not approved on this node "
            "(approved: %s); nothing of it was installed or run. If you audited this app, "
            "`fedvault fab-hash <app dir>` gives its hash: add it to the approved list.",
            what, task.run_id, received, ", ".join(sorted(self.approved)),
        )  # fmt: skip
        reason = f"ClientApp refused by the node's holder: FAB sha256 {received} is not approved"
        client = _runtime_client(self.address, self.insecure, self.root_certificates, token)
        try:
            # Flower's own functions: they pull bytes and protobuf records only (no imports).
            message, context, _run, fab = pull_task_input(client)
            actual = hashlib.sha256(fab.content).hexdigest()
            if actual != received:  # the SuperNode keys FABs by content hash: never expected
                log.error("run %d: the FAB served has sha256 %s", task.run_id, actual)
            push_message(client, Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message),
                         context)  # fmt: skip
        except Exception as err:  # the task still ends as failed below
            log.warning("run %d: could not send the refusal reply: %s", task.run_id, err)
        finally:
            push_task_output(client, None, SubStatus.FAILED, reason)
            client.close()

    def close(self) -> None:
        self.client.close()


def run_launcher(
    runtime_api_address: str,
    approved: frozenset[str],
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    parent_pid: int | None = None,
) -> None:
    """Serve the SuperNode's tasks until interrupted (or until ``parent_pid`` exits)."""
    # Started in the background by a non-interactive shell (start-supernode.sh), this
    # process inherits SIGINT ignored; the parent monitor below stops it with SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(parent_pid)  # SIGINT to this process when it is gone
    poll = float(os.environ.get(TASK_POLL_ENV, "1.0"))
    launcher = Launcher(
        runtime_api_address, approved, insecure=insecure, root_certificates=root_certificates
    )
    log.info(
        "fedvault clientapp: serving %s; approved FAB sha256: %s",
        runtime_api_address, ", ".join(sorted(approved)),
    )  # fmt: skip
    try:
        while True:
            launcher.poll_once()
            time.sleep(poll)
    finally:
        launcher.close()


def launcher_command(
    runtime_api_address: str,
    *,
    approved: Sequence[str] = (),
    approved_file: Path | str | None = None,
    parent_pid: int | None = None,
) -> list[str]:
    """``fedvault clientapp`` for a SuperNode whose Runtime API is plain HTTP on loopback
    (Flower's default for ``--isolation process`` without ``--ssl-certfile``)."""
    cmd = ["fedvault", "clientapp", "--runtime-api-address", runtime_api_address, "--insecure"]
    for h in approved:
        cmd += ["--approved-fab-hash", h]
    if approved_file is not None:
        cmd += ["--approved-fab-hashes", str(approved_file)]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


# --------------------------------------------------------------------------------------------
# CLI: `fedvault fab-hash` and `fedvault clientapp`


def cmd_fab_hash(args: argparse.Namespace) -> int:
    for path in args.paths:
        data = fab_bytes(path)
        print(f"{hashlib.sha256(data).hexdigest()}  {path}")
        if args.list:
            for name, digest in fab_contents(data):
                print(f"    {digest}  {name}")
    return 0


def cmd_clientapp(args: argparse.Namespace) -> int:
    try:
        if not args.insecure and not args.root_certificates:
            raise ConfigError("give --insecure (plain HTTP on loopback) or --root-certificates PEM")
        approved = approved_set(args.approved_fab_hash, args.approved_fab_hashes)
        run_launcher(
            args.runtime_api_address, approved, insecure=args.insecure,
            root_certificates=args.root_certificates, parent_pid=args.parent_pid,
        )  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C, or the SuperNode (--parent-pid) is gone
        raise
    except BaseException as err:
        # A SuperNode (--isolation process) without its launcher would take runs and never
        # answer them: stop it too (start-supernode.sh: the launcher's parent is the node).
        if args.parent_pid is not None:
            log.error("stopping the SuperNode (pid %d): the launcher failed: %s",
                      args.parent_pid, err)  # fmt: skip
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(args.parent_pid, signal.SIGTERM)
        raise
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fedvault fab-hash`` and ``fedvault clientapp``."""
    fh = sub.add_parser(
        "fab-hash", help="SHA-256 of the FAB `flwr run` makes from an app dir (or of a .fab)"
    )
    fh.add_argument("paths", nargs="+", metavar="APP_DIR_OR_FAB")
    fh.add_argument("--list", action="store_true", help="also every file in the FAB, hashed")
    fh.set_defaults(func=cmd_fab_hash)

    ca = sub.add_parser(
        "clientapp",
        help="run a SuperNode's (--isolation process) ClientApps: approved FAB hashes only",
    )
    ca.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime API (its --host:--port; default 127.0.0.1:9094)",
    )
    ca.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP to the Runtime API (the SuperNode's default, loopback)",
    )
    ca.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    ca.add_argument(
        "--approved-fab-hash",
        action="append",
        default=[],
        metavar="SHA256",
        help="a FAB hash the holder approved (repeatable)",
    )
    ca.add_argument(
        "--approved-fab-hashes",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of approved hashes, one a line, # comments",
    )
    ca.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) does")
    ca.set_defaults(func=cmd_clientapp)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.ops.approved_app {fab-hash,clientapp} ...``: the same two commands
    without the rest of the ``fedvault`` CLI."""
    from common.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m common.ops.approved_app")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"fedvault: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
