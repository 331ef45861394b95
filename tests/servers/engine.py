"""Is there a container engine here? Where, or why not, in words a person can act on."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

SOCKETS = (
    "/var/run/docker.sock",
    "~/.docker/run/docker.sock",
    "$XDG_RUNTIME_DIR/docker.sock",
    "$XDG_RUNTIME_DIR/podman/podman.sock",
)
"""Where Docker (and Podman's Docker-compatible API) usually listen."""


def find_engine(
    env: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] | None = None,
    which: Callable[[str], str | None] | None = None,
    ping: Callable[[str], bool] | None = None,
) -> tuple[str | None, str]:
    """(the engine's address, "") when one answers, else (None, why not): the reason names
    what was looked for (DOCKER_HOST, each socket, the docker and podman commands)."""
    env = os.environ if env is None else env
    exists = exists or (lambda path: Path(path).exists())
    which = which or shutil.which
    ping = ping or _ping
    candidates = [env["DOCKER_HOST"]] if env.get("DOCKER_HOST") else []
    sockets = [
        os.path.expanduser(s.replace("$XDG_RUNTIME_DIR", env.get("XDG_RUNTIME_DIR", "/run/user")))
        for s in SOCKETS
    ]
    candidates += [f"unix://{s}" for s in sockets if exists(s)]
    for address in candidates:
        if ping(address):
            return address, ""
    commands = [c for c in ("docker", "podman") if which(c)]
    why = [
        f"DOCKER_HOST={env['DOCKER_HOST']} does not answer"
        if env.get("DOCKER_HOST")
        else "DOCKER_HOST is unset",
        "no socket at " + ", ".join(s for s in sockets if not exists(s))
        if any(not exists(s) for s in sockets)
        else "",
        "the sockets found do not answer" if any(exists(s) for s in sockets) else "",
        f"{' and '.join(commands)} found but no engine answers"
        if commands
        else "no docker or podman command on PATH",
    ]
    return None, "no container engine (docker or podman): " + "; ".join(w for w in why if w)


def _ping(address: str) -> bool:
    try:
        import docker

        client = docker.DockerClient(base_url=address, timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False
