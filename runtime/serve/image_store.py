"""Images kept for `response_format="url"`: each served at an unguessable URL for a bounded time, in bounded memory.

The id is 128 random bits, so the URL itself is the capability (OpenAI's image URLs are signed links the same way,
fetched by browsers and tools that send no API key). Entries expire after `ttl_s`; when the store is over
`max_bytes` the oldest go first, so memory stays bounded however many url responses are asked for.
"""

import secrets
import threading
import time
from collections import OrderedDict


class ImageStore:
    def __init__(self, max_bytes: int = 256 * 2**20, ttl_s: float = 600.0) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._entries: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()  # id -> (expiry, data, type)
        self._bytes = 0
        self._lock = threading.Lock()

    async def put(self, data: bytes, media_type: str) -> str:
        """Keep `data`; returns its id. ValueError if one image is larger than the whole store."""
        if len(data) > self.max_bytes:
            raise ValueError(f"a {len(data)}-byte image does not fit this server's {self.max_bytes}-byte url store; "
                             "ask for response_format b64_json")  # fmt: skip
        image_id = secrets.token_urlsafe(16)
        with self._lock:
            self._expire(time.monotonic())
            while self._bytes + len(data) > self.max_bytes:
                _, (_, old, _) = self._entries.popitem(last=False)
                self._bytes -= len(old)
            self._entries[image_id] = (time.monotonic() + self.ttl_s, data, media_type)
            self._bytes += len(data)
        return image_id

    async def get(self, image_id: str) -> tuple[bytes, str] | None:
        """(data, media type), or None once it expired, was evicted or never was."""
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.get(image_id)
        return None if entry is None else (entry[1], entry[2])

    def _expire(self, now: float) -> None:
        while self._entries:
            image_id, (expiry, data, _) = next(iter(self._entries.items()))
            if expiry > now:
                return
            del self._entries[image_id]
            self._bytes -= len(data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
