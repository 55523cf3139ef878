"""Debian's headless Chromium driven over the DevTools protocol: open a page, read it, drag on it, take a picture.

No browser download and no driver package: Chromium's own remote-debugging websocket, spoken with ``websockets``.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from waiting import wait_for
from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
SHIFT = 8  # DevTools' modifier bit


class Browser:
    """One Chromium with one page, at ``width`` × ``height``; use as a context manager."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        command = ["chromium", *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        port_file = profile / "DevToolsActivePort"
        wait_for("Chromium's DevTools port", lambda: port_file.exists() and port_file.read_text().strip(), 120,
                 process=self.process)  # fmt: skip
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.calls = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.socket.close()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (events arriving meanwhile are skipped)."""
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.calls:
                assert "error" not in message, f"{method}: {message['error']}"
                return dict(message.get("result", {}))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def drag(self, start: tuple[float, float], end: tuple[float, float], modifiers: int = 0, steps: int = 8) -> None:
        """A left-button drag from ``start`` to ``end`` (page pixels), with ``modifiers`` held."""
        mouse = {"button": "left", "modifiers": modifiers}
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], clickCount=1, **mouse)
        for i in range(1, steps + 1):
            x, y = (start[j] + (end[j] - start[j]) * i / steps for j in (0, 1))
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, buttons=1, **mouse)
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=end[0], y=end[1], clickCount=1, **mouse)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path
