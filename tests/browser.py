"""Render a local HTML page in headless Chromium (Debian's `chromium`, installed when missing) over the DevTools
protocol: which images loaded, which links are broken, what the console said, and a full-page screenshot."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--allow-file-access-from-files", "--remote-debugging-port=0", "--window-size=1280,900",
]
PAGE_STATE = """(() => ({
  images: [...document.images].map(i => ({src: i.src, loaded: i.complete && i.naturalWidth > 0})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  tables: document.querySelectorAll('table').length,
}))()"""


@dataclass
class Rendered:
    images: list[dict]
    links: list[str]
    tables: int
    console_errors: list[str]


def chromium() -> str:
    """The chromium binary, installed from Debian's packages when missing (the test set-up's one step)."""
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    assert found, "chromium is not installed and could not be installed"
    return found


def render(page: Path, screenshot: Path, timeout: float = 60.0) -> Rendered:
    """Open `page` (file://), wait for its load event, report what loaded and save a full-page screenshot."""
    with tempfile.TemporaryDirectory(prefix="videodpo-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            port_file = Path(profile, "DevToolsActivePort")
            deadline = time.monotonic() + timeout
            while not port_file.exists() or not port_file.read_text().strip():
                assert time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(asyncio.wait_for(_drive(port, page.resolve().as_uri(), screenshot), timeout))
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # chromium and its helper processes, before the profile goes
            process.wait()


async def _drive(port: int, url: str, screenshot: Path) -> Rendered:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        socket_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with session.ws_connect(socket_url, max_msg_size=0) as socket:
            counter, errors = 0, []

            async def call(method: str, **params) -> dict:
                nonlocal counter
                counter += 1
                await socket.send_str(json.dumps({"id": counter, "method": method, "params": params}))
                return await _until(socket, lambda m: m.get("id") == counter, errors)

            for domain in ("Page", "Runtime", "Log"):
                await call(f"{domain}.enable")
            await call("Page.navigate", url=url)
            await _until(socket, lambda m: m.get("method") == "Page.loadEventFired", errors)
            state = (await call("Runtime.evaluate", expression=PAGE_STATE, returnByValue=True))["result"]["result"]
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["result"]["data"]))
            value = state["value"]
            return Rendered(value["images"], value["links"], value["tables"], errors)


async def _until(socket, done, errors: list[str]) -> dict:
    """Read DevTools messages until `done(message)`; console errors and exceptions seen meanwhile go to `errors`."""
    while True:
        message = json.loads((await socket.receive()).data)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(" ".join(str(arg.get("value")) for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        if done(message):
            return message
