"""Load a page in headless Chromium over the DevTools protocol: console errors, figure sizes, screenshot.

    python tests/browser.py report.html --screenshot docs/report.png

Uses the system ``chromium`` (Debian package) and aiohttp's websocket client (installed with
``datasets``); no browser is downloaded. Offline: the page is opened from a file:// URL and any
request to the network is blocked, so a page that needs one shows a failed load.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Sizes of every <img> and <svg>, in CSS pixels, after layout.
FIGURES_JS = """JSON.stringify([...document.querySelectorAll('img, svg')].map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName, alt: e.getAttribute('alt') || '', width: r.width, height: r.height,
          natural: e.tagName === 'IMG' ? [e.naturalWidth, e.naturalHeight] : null,
          complete: e.tagName === 'IMG' ? e.complete : true};
}))"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


async def _inspect(ws_url: str, url: str, screenshot: bool, width: int) -> dict:
    import aiohttp

    errors, ids = [], iter(range(1, 10**6))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            pending: dict = {}
            loaded = asyncio.Event()

            async def reader():
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, params = data.get("method"), data.get("params", {})
                    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                             for a in params.get("args", [])))
                    elif method == "Runtime.exceptionThrown":
                        errors.append("exception: " + params["exceptionDetails"].get("text", ""))
                    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                        errors.append("log: " + params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
                    elif method == "Network.loadingFailed":
                        errors.append("network: " + params.get("errorText", ""))
                    elif method == "Page.loadEventFired":
                        loaded.set()

            task = asyncio.create_task(reader())

            async def call(method, **params):
                i = next(ids)
                fut = asyncio.get_running_loop().create_future()
                pending[i] = fut
                await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                res = await asyncio.wait_for(fut, 60)
                if "error" in res:
                    raise RuntimeError(f"{method}: {res['error']}")
                return res.get("result", {})

            target = await call("Target.createTarget", url="about:blank")
            attached = await call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
            sid = attached["sessionId"]

            async def scall(method, **params):  # a call in the page's session
                i = next(ids)
                fut = asyncio.get_running_loop().create_future()
                pending[i] = fut
                await ws.send_str(json.dumps({"id": i, "sessionId": sid, "method": method, "params": params}))
                res = await asyncio.wait_for(fut, 60)
                if "error" in res:
                    raise RuntimeError(f"{method}: {res['error']}")
                return res.get("result", {})

            for domain in ("Runtime", "Log", "Page", "Network"):
                await scall(f"{domain}.enable")
            await scall("Network.setBlockedURLs", urls=["http://*", "https://*", "ws://*", "wss://*"])
            await scall("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                        mobile=False)
            await scall("Page.navigate", url=url)
            await asyncio.wait_for(loaded.wait(), 60)
            await asyncio.sleep(0.3)  # late console messages
            res = await scall("Runtime.evaluate", expression=FIGURES_JS, returnByValue=True)
            figures = json.loads(res["result"]["value"])
            title = (await scall("Runtime.evaluate", expression="document.title", returnByValue=True))["result"]["value"]
            shot = None
            if screenshot:
                shot = base64.b64decode((await scall("Page.captureScreenshot", format="png",
                                                     captureBeyondViewport=True))["data"])
            task.cancel()
    return {"errors": errors, "figures": figures, "title": title, "screenshot": shot}


def _stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate the process group of `proc` and wait until none of its processes is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.killpg(proc.pid, 0)  # any process of the group still alive?
            except ProcessLookupError:
                return
            time.sleep(0.05)


def inspect(page: str | os.PathLike, screenshot: bool = False, width: int = 1200, timeout: float = 120) -> dict:
    """Open ``page`` (an HTML file) in headless Chromium; returns errors, figure sizes, title, PNG bytes."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium found")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="dietprune-chromium-") as profile:
        # its own process group: Chromium's helper processes outlive the browser process by a moment and
        # keep writing into the profile, so the whole group is stopped before the profile is removed
        proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-extensions", "--disable-background-networking", "--mute-audio",
                                 f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            ws_url = None
            for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                if m:
                    ws_url = m.group(1)
                    break
            if ws_url is None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            return asyncio.run(asyncio.wait_for(_inspect(ws_url, url, screenshot, width), timeout))
        finally:
            _stop_group(proc)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page")
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--width", type=int, default=1200)
    a = ap.parse_args()
    r = inspect(a.page, screenshot=bool(a.screenshot), width=a.width)
    if a.screenshot:
        Path(a.screenshot).write_bytes(r["screenshot"])
    print(json.dumps({k: v for k, v in r.items() if k != "screenshot"}, indent=1))
    sys.exit(1 if r["errors"] or any(f["width"] <= 0 or f["height"] <= 0 for f in r["figures"]) else 0)
