"""The chat page in a real headless browser (Debian's chromium driven by Playwright): a message
gets a streamed reply equal to the API's answer, the conversation survives a reload, regenerate,
stop and clear work, and the page works with --api-key."""

import os
import re
import shutil

import httpx
import pytest

from helpers import running_server
from qwenlm.serve import ServerOptions, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("QWENLM_REQUIRE_BROWSER") != "1":  # CI sets it: there a missing browser is a failure
    pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield b
        b.close()


def _settings(page, max_tokens):
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max_tokens", str(max_tokens))
    page.dispatch_event("#max_tokens", "change")


def _count_updates(page):
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => { window.updates++; }).observe(document.getElementById('log'),
            {subtree: true, childList: true, characterData: true}); }""")


def _open(browser, model_tok, **opts):
    """A page on a fresh server (a context manager yielding (page, url))."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        model, tok = model_tok
        with running_server(create_app(model, tok, ServerOptions(served_model_name="tiny", **opts))) as url:
            page = browser.new_page()
            page.goto(url + "/")
            yield page, url
            page.close()
    return cm()


def test_chat_page_streams_a_reply(model_tok, browser):
    with _open(browser, model_tok, max_model_len=2048, max_num_seqs=2) as (page, url):
        assert page.text_content("#model") == "tiny"
        _settings(page, 16)
        page.fill("#input", "你好")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant.done", timeout=60000)
        shown = page.text_content(".msg.assistant.done .body")
        kept = page.evaluate("JSON.parse(localStorage.getItem('qwenlm-chat')).messages")
        want = httpx.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "你好"}],
            "temperature": 0, "top_p": 0.8, "max_tokens": 16}, timeout=60).json()
        n, want = want["usage"]["completion_tokens"], want["choices"][0]["message"]["content"]
        assert kept == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": want}]
        assert shown.strip()
        # under the reply: its length in tokens (the server's count), its rate and its first token's wait
        stats = page.text_content(".msg.assistant.done .stats")
        assert re.fullmatch(rf"{n} tokens? · (\d+\.\d tokens/s · )?first token \d+\.\d\d s", stats), stats
        assert (" tokens/s" in stats) == (n > 1)
        # the conversation is kept in the browser
        page.reload()
        assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
        # regenerate replaces the reply (greedy: the same text again)
        page.click("#regenerate")
        page.wait_for_selector(".msg.assistant.done", timeout=60000)
        assert page.locator(".msg.assistant").count() == 1
        kept = page.evaluate("JSON.parse(localStorage.getItem('qwenlm-chat')).messages")
        assert [m["content"] for m in kept] == ["你好", want]
        # a long reply is shown in pieces as it streams; stop it midway
        _settings(page, 1500)
        _count_updates(page)
        page.fill("#input", "Tell me a long story.")
        page.press("#input", "Enter")
        page.wait_for_function("window.updates > 3 && document.querySelectorAll('.msg.assistant')[1]"
                               " && document.querySelectorAll('.msg.assistant')[1].textContent.length > 30",
                               timeout=60000)
        assert page.locator(".msg.assistant.streaming").count() == 1  # still streaming: shown in pieces
        page.click("#stop")
        page.wait_for_selector("#send:not([disabled])", timeout=10000)
        assert page.locator(".msg.assistant.done").count() == 2
        page.click("#clear")
        assert page.locator(".msg").count() == 0


def test_chat_page_with_api_key(model_tok, browser):
    with _open(browser, model_tok, api_key="k3y", max_model_len=512, max_num_seqs=1) as (page, _):
        _settings(page, 8)
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.error", timeout=30000)
        assert "API key" in page.text_content(".msg.error")
        page.fill("#apikey", "k3y")
        page.dispatch_event("#apikey", "change")
        page.click("#regenerate")
        page.wait_for_selector(".msg.assistant.done", timeout=60000)


def test_markdown_rendering_and_escaping(model_tok, browser):
    with _open(browser, model_tok, max_model_len=64, max_num_seqs=1) as (page, _):
        html = page.evaluate("(t) => renderMarkdown(t)", "# Title\nSome **bold** and `code`.\n- a\n- b\n"
                             "```python\nprint('<b>')\n```\n<script>alert(1)</script>")
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
        assert "<ul><li>a</li><li>b</li></ul>" in html
        assert '<pre><code data-lang="python">print(&#39;&lt;b&gt;&#39;)\n</code></pre>' in html
        assert "<script>" not in html and "&lt;script&gt;" in html
        html = page.evaluate("(t) => renderMarkdown(t)", "1. one\n\n2. two\n- x\n3. three\n\nafter\n- y")
        assert html == ('<ol><li>one</li><li>two</li></ol><ul><li>x</li></ul><ol start="3"><li>three</li></ol>'
                        "<p>after</p><ul><li>y</li></ul>")


def test_code_blocks_have_a_copy_button(model_tok, browser):
    model, tok = model_tok
    with running_server(create_app(model, tok, ServerOptions(max_model_len=64, max_num_seqs=1))) as url:
        context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.goto(url + "/")
        page.evaluate("() => bubble('assistant', 'Here:\\n```python\\nprint(\"<hi>\")\\n```\\nand\\n```\\nx = 1\\n```')")
        assert page.locator(".msg.assistant pre button.copy").count() == 2
        page.locator(".msg.assistant pre button.copy").nth(0).click()
        page.wait_for_function("document.querySelector('.msg.assistant pre button.copy').textContent == 'Copied'")
        assert page.evaluate("navigator.clipboard.readText()") == 'print("<hi>")\n'
        page.locator(".msg.assistant pre button.copy").nth(1).click()
        page.wait_for_function("navigator.clipboard.readText().then((t) => t == 'x = 1\\n')")
        context.close()
