"""The `chatllm` command line: the app, its command groups, and main(). Each group lives in
its own module (audit, query, dlq, replay, configuration, kb, workflow); the top-level
commands in stack (up, worker, demo, api) and chat (chat, key, forget, feedback, whatif,
state, produce); what they share in common."""

from __future__ import annotations

import typer

from infra.cli import audit, chat, configuration, dlq, kb, keys, query, replay, stack, workflow

app = typer.Typer(
    help="chat-llm: an event-sourced backbone for LLM chat services.", no_args_is_help=True
)
app.add_typer(configuration.config_app, name="config")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(replay.replay_app, name="replay")
app.add_typer(dlq.dlq_app, name="dlq")
app.add_typer(keys.key_app, name="key")
app.add_typer(kb.kb_app, name="kb")
app.add_typer(workflow.workflow_app, name="workflow")
app.add_typer(query.query_app, name="query")
app.add_typer(stack.commands)
app.add_typer(chat.commands)
app.add_typer(query.sql_commands)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
