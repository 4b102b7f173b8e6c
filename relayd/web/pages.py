"""The HTML of the web pages: plain server-side pages that work without JavaScript.

Every value is escaped here (``html.escape``); nothing secret is ever put into a page: no
token, no password (the password field is never filled back in), no link token except the
new link the operator asked for. The style sheet is a file of relayd's own (``/static``), so
the Content-Security-Policy can forbid inline styles and every script.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relayd.web.csrf import FIELD

__all__ = ["STYLE", "AccountFacts", "Notice", "facts_table", "form", "page"]

STYLE = b"""\
body{font:16px/1.5 system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em;
color:#1d2125;background:#fafafa}
h1{font-size:1.5em}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd;vertical-align:top}
.notice{padding:.8em 1em;border-radius:6px;margin:1em 0}
.ok{background:#e3f4e6;border:1px solid #8cc79a}.error{background:#fbe7e7;border:1px solid #d99}
.info{background:#eef2f8;border:1px solid #b7c4da}
form.inline{display:inline}button{font:inherit;padding:.4em 1em;cursor:pointer}
input[type=password],input[type=email]{font:inherit;padding:.3em;width:20em}
code{background:#eee;padding:0 .2em;word-break:break-all}small{color:#555}
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


class AccountFacts(Protocol):
    """What ``relayd status`` shows for one account (``relayd.ops.status.AccountStatus``)."""

    @property
    def address(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def why(self) -> str: ...
    @property
    def fix(self) -> str: ...
    @property
    def last_success_at(self) -> float | None: ...
    @property
    def last_error_at(self) -> float | None: ...
    @property
    def last_error(self) -> str: ...
    @property
    def queued(self) -> int: ...
    @property
    def sent_copy_backlog(self) -> int: ...


@dataclass(frozen=True)
class Notice:
    kind: str  # ok | error | info
    title: str
    lines: tuple[str, ...] = ()


def when(epoch: float | None) -> str:
    return "-" if epoch is None else datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def page(title: str, body: str, *, base: str, notices: Sequence[Notice] = ()) -> str:
    shown = "".join(
        f'<div class="notice {e(n.kind)}" role="status"><strong>{e(n.title)}</strong>'
        + "".join(f"<br>{e(line)}" for line in n.lines)
        + "</div>"
        for n in notices
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        "<meta name=referrer content=same-origin>"
        f"<title>{e(title)} · relayd</title>"
        f'<link rel=stylesheet href="{e(base)}/static/relayd.css"></head><body>'
        f"<h1>{e(title)}</h1>{shown}{body}</body></html>\n"
    )


def form(
    action: str,
    csrf: str,
    button: str,
    *,
    fields: Iterable[tuple[str, str]] = (),
    inner: str = "",
    inline: bool = False,
) -> str:
    """A POST form with the session's CSRF token; ``fields`` are hidden (name, value)."""
    hidden = f'<input type=hidden name="{FIELD}" value="{e(csrf)}">' + "".join(
        f'<input type=hidden name="{e(k)}" value="{e(v)}">' for k, v in fields
    )
    klass = ' class="inline"' if inline else ""
    return (
        f'<form method=post action="{e(action)}"{klass}>{hidden}{inner}'
        f"<button type=submit>{e(button)}</button></form>"
    )


def facts_table(facts: AccountFacts) -> str:
    state = facts.state if not facts.why or facts.state == "ok" else f"{facts.state}: {facts.why}"
    error = (
        "-" if facts.last_error_at is None else f"{when(facts.last_error_at)} {facts.last_error}"
    )
    rows = (
        ("State", state),
        ("Last success", when(facts.last_success_at)),
        ("Last error", error),
        ("Queued", str(facts.queued)),
        ("Sent-copy backlog", str(facts.sent_copy_backlog)),
    )
    return (
        "<table><tbody>"
        + "".join(f"<tr><th scope=row>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )
