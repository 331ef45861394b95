"""`chatllm key`: API keys as events: create, rotate, revoke, list (admin scope)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from actors.keys import hash_key
from infra.cli.common import Service, _get_json, _print_rows, err, out, service_options
from infra.services.keys import new_secret

key_app = typer.Typer(
    help="API keys: create, rotate, revoke, list. Each change is an event in the log.",
    no_args_is_help=True,
)

KeyIdArg = typer.Argument(..., help="the key's id, as `key list` shows it")
LIST_COLUMNS = ["key_id", "name", "user", "scopes", "status", "expires_at", "last_used_at"]


def _post(path: str, body: dict[str, Any], service: Service) -> dict[str, Any]:
    found: dict[str, Any] = _get_json(
        path, {}, method="POST", content=json.dumps(body).encode(), **service.where()
    )
    return found


def _issued(result: dict[str, Any], what: str) -> None:
    """The key alone on stdout (for a pipe); what it is on stderr."""
    sys.stdout.write(result["key"] + "\n")
    expires = f", expires {result['expires_at']}" if result["expires_at"] else ""
    typer.echo(
        f"{what} {result['key_id']} for {result['user']} (scopes {','.join(result['scopes'])}"
        f"{expires}): the key above is shown once and stored nowhere",
        err=True,
    )


@key_app.command("create")
@service_options
def key_create(
    user: str = typer.Option(..., "--user", help="whom the key's requests are by"),
    name: str = typer.Option("", "--name", help="what the key is for"),
    scope: list[str] = typer.Option(
        ["chat", "query"], "--scope", help="chat, query, ingest, admin (repeatable)"
    ),
    limit: str = typer.Option("", "--limit", help='limits notation, e.g. "600/minute"'),
    expires_in: float = typer.Option(0, "--expires-in", help="seconds until it expires"),
    *,
    service: Service,
) -> None:
    """Issue a key for the tenant: printed once, stored nowhere (the log keeps its hash)."""
    body: dict[str, Any] = {
        "user": user,
        "name": name,
        "scopes": sorted(set(scope)),
        "limit": limit,
    }
    if expires_in:
        body["expires_in_s"] = expires_in
    _issued(_post("/v1/admin/keys", body, service), "issued")


@key_app.command("rotate")
@service_options
def key_rotate(
    key_id: str = KeyIdArg,
    grace: float = typer.Option(
        -1, "--grace", help="seconds the old key keeps working (default: auth.rotation_grace_s)"
    ),
    *,
    service: Service,
) -> None:
    """Issue a successor; the old key works until the grace period ends."""
    body = {"grace_s": grace} if grace >= 0 else {}
    result = _post(f"/v1/admin/keys/{key_id}/rotate", body, service)
    _issued(result, f"rotated {key_id} (works until {result['rotated']['expires_at']}); issued")


@key_app.command("revoke")
@service_options
def key_revoke(
    key_id: str = KeyIdArg,
    reason: str = typer.Option("", "--reason", help="why, for the audit trail"),
    *,
    service: Service,
) -> None:
    """Revoke a key: every API process refuses it within a second."""
    result = _post(f"/v1/admin/keys/{key_id}/revoke", {"reason": reason}, service)
    out.print(f"revoked {result['key_id']} ({result['user']})", highlight=False)


@key_app.command("bootstrap")
def key_bootstrap(
    tenant: str = typer.Option(..., "--tenant", help="tenant the key belongs to"),
    user: str = typer.Option(..., "--user", help="user the key acts as"),
    scope: list[str] = typer.Option(
        ["chat", "query"], "--scope", help="chat, query, ingest, admin (repeatable)"
    ),
    limit: str = typer.Option("", "--limit", help='requests it may make, e.g. "600/minute"'),
) -> None:
    """A config-file key (auth.keys), made offline: the first admin key, say.

    Prints the key once, and the config entry that stores only its hash."""
    from infra.http.security import SCOPES

    unknown = sorted(set(scope) - set(SCOPES))
    if unknown:
        err.print(f"[red]unknown scope(s) {unknown}: {', '.join(SCOPES)}[/red]")
        raise typer.Exit(2)

    key = new_secret()
    err.print("[bold]API key (shown once, store it now):[/bold]")
    sys.stdout.write(key + "\n")
    err.print("\nadd to chatllm.toml:\n")
    entry = (
        f'[[auth.keys]]\nsha256 = "{hash_key(key)}"\ntenant = "{tenant}"\nuser = "{user}"\n'
        f"scopes = {json.dumps(sorted(set(scope)))}\n" + (f'limit = "{limit}"\n' if limit else "")
    )
    err.print(entry, highlight=False, markup=False)


@key_app.command("list")
@service_options
def key_list(
    fmt: str = typer.Option("table", "--format", help="table or json"),
    *,
    service: Service,
) -> None:
    """The tenant's keys: status, scopes, expiry and last use; never the key itself."""
    keys: list[dict[str, Any]] = _get_json("/v1/admin/keys", {}, **service.where())
    if fmt == "json":
        for key in keys:
            sys.stdout.write(json.dumps(key, ensure_ascii=False) + "\n")
        return
    _print_rows([{**k, "scopes": ",".join(k["scopes"])} for k in keys], "API keys", LIST_COLUMNS)
