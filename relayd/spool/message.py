"""A message as the spool holds it: its envelope and where its content is, read from its file.

The file is checked as it is opened (``relayd.spool.fileformat``): its first line, the header
block, the end record and its length, and the queue id inside against the file's name. A
file that fails any of these raises ``SpoolError``, and its caller quarantines it: a file cut
short by a crash is never sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from relayd.core.envelope import Envelope
from relayd.core.queues import Queue
from relayd.errors import SpoolError
from relayd.spool.fileformat import HEAD_READ, TRAILER_LEN, is_complete, parse_head, trailer
from relayd.spool.sealing import SALT_BYTES, FileCipher, plaintext_length

__all__ = ["InProgress", "StoredMessage", "read_message"]


class InProgress(FileNotFoundError):
    """The file is reserved for a reception that has not finished: not a message yet, and
    not to be touched (``relayd.spool.reserved``)."""


@dataclass(frozen=True)
class StoredMessage:
    queue_id: str
    queue: Queue
    path: Path
    envelope: Envelope
    content_offset: int
    content_length: int
    # The content, when the file was small enough to be read whole with its envelope.
    preloaded: bytes | None = field(default=None, repr=False, compare=False)
    # A sealed file (relayd.spool.sealing): its key, and the content's length as stored.
    cipher: FileCipher | None = field(default=None, repr=False, compare=False)
    stored_length: int | None = None

    def read_content(self) -> bytes:
        if self.preloaded is not None:
            return self.preloaded
        with open(self.path, "rb") as f:
            f.seek(self.content_offset)
            if self.cipher is None:
                return f.read(self.content_length)
            assert self.stored_length is not None
            return self.cipher.open_all(f.read(self.stored_length))

    def iter_content(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        if self.preloaded is not None:
            for start in range(0, len(self.preloaded), chunk_size):
                yield self.preloaded[start : start + chunk_size]
            return
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.content_offset)
            if self.cipher is not None:
                assert self.stored_length is not None
                for segment in self.cipher.iter_open(f.read, self.stored_length):
                    for start in range(0, len(segment), chunk_size):
                        yield segment[start : start + chunk_size]
                return
            left = self.content_length
            while left > 0:
                chunk = f.read(min(chunk_size, left))
                if not chunk:
                    raise SpoolError(f"{self.queue_id}: message file shrank while reading")
                left -= len(chunk)
                yield chunk

    def head_section(self, limit: int) -> bytes:
        """The start of the content up to the end of its header section (at most about
        ``limit`` bytes): all a DSN carries back, without reading a big message whole."""
        head = b""
        for chunk in self.iter_content():
            head += chunk
            if b"\r\n\r\n" in head or len(head) > limit:
                break
        return head


def read_message(
    path: str,
    queue: Queue,
    *,
    preload: int = 0,
    cipher_for: Callable[[str, bytes], FileCipher],
) -> StoredMessage:
    """Open and check the message file at ``path``; a file of at most ``preload`` bytes is
    read whole, content included. ``cipher_for(queue id, salt)`` opens a sealed one.

    Raises FileNotFoundError when there is no such file (``InProgress``: not yet a message),
    SpoolError when it is damaged.
    """
    name = os.path.basename(path)
    # One open, one fstat and, for a file of at most ``preload`` bytes, one read.
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not is_complete(st.st_mode):
                raise InProgress(path)
            size = st.st_size
            whole = size <= preload
            data = f.read(size if whole else HEAD_READ)
            layout = parse_head(data)
            offset = layout.content_offset
            if offset > len(data) and not whole:
                data += f.read(offset - len(data))
            if not layout.complete_in(data):
                raise SpoolError("truncated envelope")
            header = layout.header(data)
            cipher = None
            if layout.sealed:
                cipher = cipher_for(name, header[:SALT_BYTES])
                header = cipher.open_envelope(header[SALT_BYTES:])
            envelope = Envelope.from_json(header)
            if size < offset + TRAILER_LEN:
                raise SpoolError("no end record")
            if whole:
                end_record = data[size - TRAILER_LEN :]
            else:
                f.seek(size - TRAILER_LEN)
                end_record = f.read(TRAILER_LEN)
    except (FileNotFoundError, SpoolError):
        raise
    except PermissionError as exc:
        # A reserved file is not readable by its owner (0200): no message yet, no damage.
        if not is_complete(os.stat(path).st_mode):
            raise InProgress(path) from None
        raise SpoolError(f"unreadable: {exc}") from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SpoolError(f"unreadable: {exc}") from exc
    length = size - offset - TRAILER_LEN
    if end_record != trailer(length):
        raise SpoolError("end record missing or length mismatch")
    if envelope.queue_id != name:
        raise SpoolError("queue id does not match file name")
    content = data[offset : offset + length] if whole else None
    if cipher is None:
        return StoredMessage(name, queue, Path(path), envelope, offset, length, content)
    if content is not None:
        content = cipher.open_all(content)
    return StoredMessage(
        name,
        queue,
        Path(path),
        envelope,
        offset,
        plaintext_length(length),
        content,
        cipher=cipher,
        stored_length=length,
    )
