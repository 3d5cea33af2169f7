"""The bundle's start scripts, rendered from the argument builders of :mod:`.commands`.

Each script resolves paths from its own location (``$HERE``), so a bundle keeps working
after it is copied: the bundles of :mod:`.layout` are rooted at the literal ``$HERE`` and
passed to the same builders the Python harness runs, and each argument is written as a
shell word. Arguments holding a ``$`` are the script's own variables (``$HERE``, ``$PORT``,
``$$``, ``${FEDVAULT_SUPERLINK:-...}``, ``${FEDVAULT_DATA_DIR:-}``) and are double-quoted so
the shell expands them; every other argument is quoted literally (``shlex.quote``, as
``shlex.join`` does).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import tomli_w

from common.files import write_file_atomic
from common.ops.approved_app import launcher_command

from .commands import (
    DEFAULT_SUPERNODE_RUNTIME_PORT,
    flwr_config,
    register_command,
    superlink_command,
    supernode_command,
)
from .layout import Federation, client_bundle, superlink_bundle

__all__ = ["shell_words", "write_scripts"]

HERE = Path("$HERE")
_HERE = 'HERE="$(cd "$(dirname "$0")" && pwd)"'
#: Lets the operator point a copied bundle at another address without re-provisioning.
_ADDRESS = "${{FEDVAULT_SUPERLINK:-{}}}"
#: Where this holder's ``partition-<i>.fvd`` is (``fedvault data prepare --out``), if set.
_DATA_DIR = "${FEDVAULT_DATA_DIR:-}"


def _word(arg: str) -> str:
    if "$" not in arg:
        return shlex.quote(arg)
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'


def shell_words(args: list[str]) -> str:
    """``args`` as one shell command line; ``$`` variables in an argument are expanded."""
    return " ".join(_word(a) for a in args)


def _script(path: Path, comment: str, *lines: str) -> None:
    body = "#!/bin/sh\nset -eu\n" + comment + _HERE + "\n" + "".join(f"{x}\n" for x in lines)
    write_file_atomic(path, body.encode(), mode=0o755)


def write_scripts(fed: Federation) -> None:
    """Shell scripts holding the exact flags; paths resolve from the script's own dir."""
    address = _ADDRESS.format(fed.superlink_address)
    sl = superlink_bundle(HERE, fed.num_clients)
    _script(
        fed.superlink.start_script,
        "# The SuperLink: TLS on Fleet/Control/Runtime APIs (one port), SuperNode auth on.\n"
        "# Only SuperNodes registered with register-supernodes.sh can connect.\n",
        shell_words(["mkdir", "-p", str(sl.database.parent)]),
        "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
        "exec "
        + shell_words(superlink_command(sl, port=fed.superlink_port, database=sl.database))
        + ' "$@"',
    )
    _script(
        fed.superlink.flwr_script,
        "# `flwr` with a private FLWR_HOME whose default connection is this SuperLink over\n"
        "# TLS, trusting only the federation's CA: ./flwr.sh supernode list, ./flwr.sh run ...\n",
        "export " + "FLWR_HOME=" + _word(str(sl.flwr_home)),
        'mkdir -p "$FLWR_HOME"',
        'cat > "$FLWR_HOME/config.toml" <<EOF',
        tomli_w.dumps(flwr_config(address, str(sl.ca_cert))) + "EOF",
        'exec flwr "$@"',
    )
    _script(
        fed.superlink.register_script,
        "# Register every SuperNode's public key with the running SuperLink (Control API).\n",
        *(
            shell_words([str(sl.flwr_script), *register_command(sl, c.partition_id)])
            for c in fed.clients
        ),
    )
    for c in fed.clients:
        here = client_bundle(HERE, c.partition_id)
        launcher = launcher_command(
            "127.0.0.1:$PORT",
            approved_file=here.approved_apps,
            parent_pid="$$",  # type: ignore[arg-type]  # the script's pid: the SuperNode's
        )
        supernode = supernode_command(
            here,
            address,
            fed.num_clients,
            runtime_port="$PORT",
            state_dir=here.state_dir,
            isolation="process",
            # the holder's own encrypted partition; empty: the run config's path, as before
            encrypted_data_dir=_DATA_DIR,
        )
        _script(
            c.start_script,
            f"# SuperNode for partition {c.partition_id} of {fed.num_clients}: TLS to the "
            "SuperLink\n# (trusting only ca.pem), authenticated with supernode-auth.key.\n"
            "# --isolation process: the SuperNode runs no app itself; `fedvault clientapp`\n"
            "# starts the ClientApps whose FAB hash is in approved-apps.txt and refuses the\n"
            "# rest. The two stop together: the launcher exits when the SuperNode (this\n"
            "# script's pid, after exec) does, and stops it if it fails itself.\n"
            "# Usage: [FEDVAULT_DATA_DIR=<your encrypted partition's dir>] start-supernode.sh\n"
            "#        [--port RUNTIME_PORT] [flower-supernode flags]\n",
            shell_words(["mkdir", "-p", str(here.state_dir)]),
            f"PORT={DEFAULT_SUPERNODE_RUNTIME_PORT}",
            'if [ "${1:-}" = "--port" ]; then PORT="$2"; shift 2; fi',
            shell_words(launcher) + " &",
            "exec " + shell_words(supernode) + ' "$@"',
        )
