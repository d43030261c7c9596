"""The chat page in a real headless browser (Debian's chromium driven by Playwright): type a message, see
the answer stream in, ask again in the same conversation; a screenshot is saved for people to look at."""

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import serve_harness
from test_generate import env  # noqa: F401 (env is a fixture)

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package drives the browser: "
                               "pip install playwright (the system chromium is used; no `playwright install`)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def api_answer(url: str, messages: list[dict]) -> str:
    """What the API answers with the page's settings (the defaults: temperature 1, seed 0)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({"messages": messages}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def test_the_chat_page_streams_answers_and_keeps_the_conversation(env, tiny_gguf, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    srv = serve_harness.start(env, tiny_gguf, 1, "--max-tokens", 24, tmp=tmp_path)
    try:
        with sync_api.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=FLAGS)
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                outside = []  # any request that leaves the server: the page must fetch nothing from elsewhere
                page.on("request", lambda r: None if r.url.startswith(srv.url) else outside.append(r.url))
                page.goto(srv.url + "/")
                sync_api.expect(page.locator("#model")).to_have_text("tiny")
                # count the answer's text updates as they arrive
                page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                    .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
                answers = []
                for text in ("Hello there", "And then?"):
                    page.fill("#input", text)
                    page.press("#input", "Enter")
                    done = page.locator(".assistant.done").nth(len(answers))
                    done.wait_for(timeout=60_000)
                    answers.append(done.inner_text())
                page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
                print(f"screenshot: {tmp_path / 'chat.png'}")
                updates = page.evaluate("window.updates")
            finally:
                ctx.close()
        first = api_answer(srv.url, [{"role": "user", "content": "Hello there"}])
        second = api_answer(srv.url, [{"role": "user", "content": "Hello there"},
                                      {"role": "assistant", "content": first},
                                      {"role": "user", "content": "And then?"}])
        assert answers == [first, second] and first
        assert updates > 2 * 4, updates  # the bubbles and more than one update per answer: streamed, not whole
        assert not outside, outside
        srv.terminate()
        assert srv.wait(30) == 0, srv.stderr
    finally:
        srv.kill()
