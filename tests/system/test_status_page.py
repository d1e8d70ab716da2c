"""System tier: the status page in Debian's headless Chromium against the real API of a
real agent. The browser is asked for credentials at the page (it answers with the ones in
the address, as after a person's prompt) and sends them with the page's own requests: the
task list, the event stream and the log tail, which all need them by default. Every wait
is on the page's DOM (a MutationObserver in the browser), none is a sleep."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

from tests import chromium
from tests.system.conftest import assignment
from tests.system.test_api import PASSWORD, USER, Api, api  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "build" / "status-page.png"
PHONE = (390, 844)
# page.css's --accent: the fill of a running task's progress bar
BAR_BLUE = (0x2F, 0x6F, 0xDF)


def bar(task_id: int) -> str:
    """JS: the task's progress in percent while it runs (null before, or once it ended)."""
    return (f"(() => {{ const li = document.querySelector('[data-task=\"{task_id}\"]');"
            " if (!li || !li.classList.contains('running')) return null;"
            " return +li.querySelector('[role=progressbar]').getAttribute('aria-valuenow');"
            " })()")


def test_the_status_page_follows_a_running_task(api: Api,  # noqa: F811 (the fixture)
                                                tmp_path: Path) -> None:
    started = time.monotonic()
    a = assignment("fakerender", {"duration": 8, "lines": 2}, [1])
    tid = a["tasks"][0]["id"]
    with chromium.browser(tmp_path / "profile", *PHONE) as b:
        b.navigate(f"http://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}"
                   f"@127.0.0.1:{api.port}/")
        b.wait_for("document.getElementById('link').textContent === 'live'", 60)
        b.evaluate("window.sameDocument = true")  # gone if the page ever reloads
        # the node's figures come with the stream's node event
        ram = b.wait_for("document.getElementById('ram').textContent.includes('free of')"
                         " && document.getElementById('ram').textContent", 30)
        assert "free of" in ram
        # a task assigned after the page loaded appears, and its bar moves while it runs
        r = api.post("/api/v1/assign", json=a)
        assert r.status_code == 202, r.text
        first = b.wait_for(f"(v => v > 0 && v < 100 && v)({bar(tid)})", 60)
        moved = b.wait_for(f"(v => v > {first} && v < 100 && v)({bar(tid)})", 60)
        assert first < moved < 100
        # the first task is selected: its log's tail follows the output
        b.wait_for("document.getElementById('log').textContent"
                   ".includes('fakerender: frame 1 progress 0.')", 30)
        png = b.screenshot()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(png)
        print(f"\nstatus page screenshot: {SCREENSHOT}")
        # the end arrives too: done at 100 %
        b.wait_for(f"(li => li && li.classList.contains('done') && "
                   "li.querySelector('[role=progressbar]').getAttribute('aria-valuenow')"
                   f" === '100')(document.querySelector('[data-task=\"{tid}\"]'))", 60)
        assert b.evaluate("window.sameDocument === true")
        # one column on a phone: nothing wider than the screen
        assert b.evaluate("document.documentElement.scrollWidth") <= PHONE[0]
    width, height, _rows = chromium.png_pixels(png)
    assert (width, height) == PHONE
    counts = chromium.colours(png)
    # not blank: many colours (text is anti-aliased), none covering nearly everything, and
    # the running bar's own blue among them
    assert len(counts) >= 32, len(counts)
    assert max(counts.values()) < 0.95 * width * height
    assert counts.get(BAR_BLUE, 0) >= 20, sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    print(f"status page test: {time.monotonic() - started:.1f} s, {len(counts)} colours")
