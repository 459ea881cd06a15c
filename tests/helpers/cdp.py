"""Test-only: headless Chromium driven over the Chrome DevTools Protocol, on the `websockets` client the stream
tests use anyway (no browser download, no driver package): launch, open a page, evaluate, type, click, screenshot.
The stream page's and the server page's tests both drive Debian's Chromium through it."""

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager

from websockets.sync.client import connect

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1000,900", "--force-device-scale-factor=1"]  # fmt: skip


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab, attached in flat mode: commands carry its session id over the browser's one socket."""

    def __init__(self, browser, session_id: str) -> None:
        self.browser, self.session_id = browser, session_id

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, session_id=self.session_id, **params)

    def evaluate(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.2):
        """Polls a JS expression until it is truthy; returns its value (TimeoutError with the last one)."""
        deadline, value = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll_s)
        raise TimeoutError(f"{expression} stayed {value!r} for {timeout_s} s")

    def box(self, selector: str) -> list[float]:
        """[x, y, width, height] of the element on screen."""
        return self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                             ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")  # fmt: skip

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        x, y, w, h = self.box(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x + w / 2, y=y + h / 2, button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: str | None = None, selector: str | None = None) -> bytes:
        """PNG of the page (or of one element's box), also written to `path` where given."""
        options = {}
        if selector is not None:
            x, y, w, h = self.box(selector)
            options["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png", **options)["data"])
        if path is not None:
            with open(path, "wb") as f:
                f.write(png)
        return png


class Browser:
    def __init__(self, socket) -> None:
        self.socket, self._ids = socket, itertools.count(1)

    def send(self, method: str, session_id: str | None = None, **params) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if session_id:
            message["sessionId"] = session_id
        self.socket.send(json.dumps(message))
        while True:  # events arrive in between; this client only needs replies
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", url=url)["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, session)

    def open_loaded(self, url: str, timeout_s: float = 30) -> Page:
        """A tab on `url` once it has loaded."""
        page = self.open(url)
        page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout_s)
        return page


@contextmanager
def chromium(executable: str, startup_s: float = 30.0):
    """Headless Chromium with a throwaway profile; yields a Browser; kills that process (by its id) at the end."""
    profile = tempfile.mkdtemp(prefix="diffrt-chromium-")
    log_path = os.path.join(profile, "stderr.log")  # a file, not a pipe: an undrained pipe would stall the browser
    with open(log_path, "w") as log:
        process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        endpoint, deadline = None, time.monotonic() + startup_s
        while endpoint is None and time.monotonic() < deadline and process.poll() is None:
            with open(log_path) as log:
                found = re.search(r"DevTools listening on (ws://\S+)", log.read())
            endpoint = found and found.group(1)
            time.sleep(0.05)
        if endpoint is None:
            with open(log_path) as log:
                raise RuntimeError("chromium did not start: " + log.read()[-2000:])
        with connect(endpoint, max_size=64 * 2**20) as socket:
            yield Browser(socket)
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
