"""Debian's Chromium, headless, driven over the DevTools protocol (a websocket; no browser download, no driver):
open a page, type, click, wait for a JavaScript condition, screenshot. Started and stopped with bounded timeouts."""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time

import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-device-scale-factor=1", "--window-size=900,900", "--remote-debugging-port=0"]  # fmt: skip
START_TIMEOUT_S = 30


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab's DevTools session: send(method, **params) -> result."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._id = 0

    def send(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} was not true within {timeout_s} s")
            time.sleep(0.1)

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

    def screenshot(self, selector: str) -> bytes:
        """PNG of the element's box on screen."""
        x, y, w, h = self.box(selector)
        clip = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", format="png", clip=clip)["data"])


@contextlib.contextmanager
def chromium_page(url: str):
    """A headless Chromium with one tab on `url`, loaded."""
    profile = tempfile.mkdtemp(prefix="diffrt-chromium-")
    proc = subprocess.Popen([chromium_path(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start its DevTools port within {START_TIMEOUT_S} s")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()
        page = Page(target["webSocketDebuggerUrl"])
        page.send("Page.enable")
        page.send("Page.navigate", url=url)
        page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")
        yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
