"""Secret values (SPEC "A secret value"), read from their source at load time.

A secret's value never appears in a message: problems name the source (environment variable,
file, credential), never its content.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from yaml.nodes import MappingNode, ScalarNode

from relayd.config.model import Secret
from relayd.config.yamlnodes import Item, NodeReader, is_null

__all__ = ["DEFAULT_CREDENTIALS_DIRECTORY", "read_secret", "read_service_account_key"]

# systemd's LoadCredential= places credentials here and sets $CREDENTIALS_DIRECTORY to it.
DEFAULT_CREDENTIALS_DIRECTORY = Path("/run/credentials/relayd.service")

SECRET_FORMS = "a secret value: {env: NAME}, {file: PATH}, {credential: NAME} or a string"
_SOURCES = ("env", "file", "credential")


def read_secret(rd: NodeReader, item: Item) -> Secret | None:
    node = item.node
    if node is None:
        return None
    if isinstance(node, ScalarNode) and not is_null(node):
        if not node.value:
            rd.error(item.path, item.line, "the secret is empty")
            return None
        rd.warn(
            item.path,
            item.line,
            "secret written in the config file itself; keep it in a file ({file: PATH}, "
            "mode 0640) or a systemd credential ({credential: NAME}) instead",
        )
        return Secret(value=str(node.value), source="literal")
    if not isinstance(node, MappingNode):
        rd.expected(item, SECRET_FORMS)
        return None
    fields = rd.mapping(item, _SOURCES)
    given = [key for key in _SOURCES if key in fields]
    if len(given) != 1:
        if len(given) > 1 or not node.value:  # other keys were reported as unknown already
            rd.error(item.path, item.line, "write exactly one of env, file or credential")
        return None
    kind = given[0]
    name = rd.text(fields[kind], "a name" if kind != "file" else "a path")
    if name is None:
        return None
    if kind == "env":
        return _from_env(rd, item, name)
    if kind == "file":
        return _from_file(rd, item, rd.base_dir / name)
    return _from_credential(rd, item, name)


def _from_env(rd: NodeReader, item: Item, name: str) -> Secret | None:
    value = os.environ.get(name)
    if value is None:
        rd.error(item.path, item.line, f"environment variable {name} is not set")
        return None
    if not value:
        rd.error(item.path, item.line, f"environment variable {name} is empty")
        return None
    return Secret(value=value, source=f"env:{name}")


def _strip_newline(text: str) -> str:
    # One trailing newline, as `echo secret > file` writes it; anything else is the secret.
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _read_text(path: Path) -> str:
    with path.open("rb") as handle:
        data = handle.read()
    return _strip_newline(data.decode("utf-8"))


def _from_file(rd: NodeReader, item: Item, path: Path) -> Secret | None:
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IROTH:
            # Group-readable is fine (root:relayd 0640); world-readable means any local user
            # (or a compromised application) can read it.
            rd.error(
                item.path,
                item.line,
                f"secret file {path} is readable by other users (mode "
                f"{stat.S_IMODE(mode):04o}); run: chmod o-rwx {path}",
            )
            return None
        value = _read_text(path)
    except OSError as exc:
        rd.error(item.path, item.line, f"cannot read secret file {path}: {exc.strerror}")
        return None
    except UnicodeDecodeError:
        rd.error(item.path, item.line, f"secret file {path} is not UTF-8 text")
        return None
    if not value:
        rd.error(item.path, item.line, f"secret file {path} is empty")
        return None
    return Secret(value=value, source=f"file:{path}")


def _from_credential(rd: NodeReader, item: Item, name: str) -> Secret | None:
    if "/" in name or name in (".", ".."):
        rd.error(item.path, item.line, f"credential name {name!r} must not contain /")
        return None
    directory = os.environ.get("CREDENTIALS_DIRECTORY") or str(DEFAULT_CREDENTIALS_DIRECTORY)
    path = Path(directory) / name
    hint = f"with systemd, add LoadCredential={name}:/path/to/secret to relayd.service"
    try:
        value = _read_text(path)
    except OSError as exc:
        rd.error(
            item.path,
            item.line,
            f"credential {name} is not readable ({path}: {exc.strerror}); {hint}",
        )
        return None
    except UnicodeDecodeError:
        rd.error(item.path, item.line, f"credential {name} is not UTF-8 text")
        return None
    if not value:
        rd.error(item.path, item.line, f"credential {name} is empty")
        return None
    return Secret(value=value, source=f"credential:{name}")


def read_service_account_key(rd: NodeReader, item: Item) -> Secret | None:
    """A Google service-account key: a secret that must hold the JSON key file Google issues."""
    secret = read_secret(rd, item)
    if secret is None:
        return None
    try:
        document = json.loads(secret.reveal())
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("type") != "service_account":
        rd.error(
            item.path,
            item.line,
            f"{secret.source} is not a Google service-account JSON key "
            '(expected a JSON object with "type": "service_account")',
        )
        return None
    return secret
