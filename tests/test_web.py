"""The chat page at ``/`` (assistant/web), end to end in headless Chromium against a real loopback server.

Chromium is Debian's (``apt-get install chromium``; ``.ci/run`` installs it), driven by Playwright through that
executable: Playwright's own browser downloads are never used. Without Chromium or Playwright these tests skip
locally and fail under ``CI=true``. Screenshots of each step go to ``screenshots/`` (``$ASSISTANT_SCREENSHOTS``).

``test_page_restores_history_after_reload`` needs the Conversations REST endpoints (``GET /v1/conversations``,
``GET /v1/conversations/{id}/items``); the others need only the socket.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from assistant.engine.model import ChatModel
from assistant.keys import Keys
from tests.conftest import RunningServer, running_server
from tests.vision_fixtures import load_tiny_llava_chat, make_image

CHROMIUM = os.environ.get("ASSISTANT_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("ASSISTANT_SCREENSHOTS", Path(__file__).resolve().parent.parent / "screenshots"))
TIMEOUT_MS = 60_000
# The random model runs every answer to the end of its context: long enough to press Stop while it streams.
CONTEXT_POSITIONS = 1024


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"), max_position_embeddings=CONTEXT_POSITIONS)


@pytest.fixture
async def vision_server(vision_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(vision_model, data_dir, temperature=0) as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; .ci/run installs it")
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1000, "height": 700})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, f"the page raised: {errors}"


def _missing_browser() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def png_file(tmp_path: Path, seed: int = 3) -> Path:
    path = tmp_path / f"shapes-{seed}.png"
    make_image(seed, size=(96, 72)).save(path)
    return path


async def attach(page: Any, path: Path) -> None:
    """The user's way: the Attach button opens the file picker."""
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Attach images").click()
    await (await chooser.value).set_files(str(path))


async def wait_until_answered(page: Any, num_answers: int = 1) -> None:
    """Until the page shows ``num_answers`` answers and is ready for the next message."""
    await page.wait_for_function("""(n) => {
        const answers = document.querySelectorAll('.message.assistant');
        return answers.length === n && !answers[n - 1].hasAttribute('aria-busy')
            && !document.getElementById('send').disabled;
    }""", arg=num_answers)


async def ask(page: Any, text: str) -> None:
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")


def conversation_id_of(page: Any) -> str:
    return page.url.partition("#")[2]


# ---------------------------------------------------------------- without a browser


async def test_the_page_and_its_files_are_served_without_a_key(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, auth="on") as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient() as http:
            page = await http.get(f"{base}/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert '<script src="/web/app.js"' in page.text
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            script = await http.get(f"{base}/web/app.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            assert (await http.get(f"{base}/web/style.css")).status_code == 200
            assert (await http.get(f"{base}/web/../v1/models")).status_code in (401, 404)
            assert (await http.get(f"{base}/web/missing.js")).status_code == 404
            assert (await http.get(f"{base}/v1/models")).status_code == 401  # the data still needs a key


# ---------------------------------------------------------------- in Chromium


async def test_page_streams_an_answer_about_an_image_and_stops_the_next(
        vision_server: RunningServer, page: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    await page.goto(f"http://127.0.0.1:{vision_server.port}/")
    await expect(page.locator("#status")).to_have_text("Ready.")
    await attach(page, png_file(tmp_path))
    await expect(page.locator("#attachments img")).to_have_count(1)  # the preview
    # A pasted and a dropped image are previewed too; one of them is removed again.
    await page.evaluate("""(png) => {
        const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
        const files = (name) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/png'}));
            return transfer;
        };
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: files('pasted.png'), bubbles: true, cancelable: true}));
        document.querySelector('main').dispatchEvent(
            new DragEvent('drop', {dataTransfer: files('dropped.png'), bubbles: true, cancelable: true}));
    }""", base64.b64encode(png_file(tmp_path, 4).read_bytes()).decode())
    await expect(page.locator("#attachments img")).to_have_count(3)
    await page.get_by_role("button", name="Remove dropped.png").click()
    await expect(page.locator("#attachments img")).to_have_count(2)

    prompt = page.get_by_label("Message", exact=True)
    await prompt.fill("What is in")
    await prompt.press("Shift+Enter")  # a new line, not a send
    await prompt.type("this picture?")
    assert await prompt.input_value() == "What is in\nthis picture?"
    await expect(page.locator(".message")).to_have_count(0)
    await screenshot(page, "1-attached")

    # Count the text pieces added to the answer as they arrive.
    await page.evaluate("""() => {
        window.deltaCount = 0;
        new MutationObserver((records) => {
            for (const r of records) if (r.target.classList?.contains('text')) window.deltaCount += r.addedNodes.length;
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true});
    }""")
    await prompt.press("Enter")
    user = page.locator(".message.user").first
    await expect(user.locator("img")).to_have_count(2)
    await expect(user.locator(".text")).to_have_text("What is in\nthis picture?")
    assert await page.locator("#attachments img").count() == 0
    # Text is on screen while the answer is still running (Stop enabled).
    await page.wait_for_function("""() => {
        const answer = document.querySelector('.message.assistant .text');
        return answer && answer.textContent.length > 0 && !document.getElementById('stop').disabled;
    }""")
    await screenshot(page, "2-streaming")
    await wait_until_answered(page)
    assert await page.evaluate("window.deltaCount") > 1
    first_answer = await page.locator(".message.assistant .text").first.text_content()
    assert first_answer

    conversation_id = conversation_id_of(page)
    assert conversation_id.startswith("conv_")
    store = vision_server.app.store
    assert store.conversation_exists(conversation_id, "default")

    await ask(page, "Tell me a very long story.")
    second = page.locator(".message.assistant").nth(1)
    await expect(second.locator(".text")).not_to_be_empty()
    await page.get_by_role("button", name="Stop").click()
    await expect(second.locator(".note")).to_have_text("Stopped.")
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    await screenshot(page, "3-stopped")
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await screenshot(page, "5-phone")
    items = store.list_items(conversation_id)
    assert [item.role for item in items] == ["user", "assistant", "user", "assistant"]
    assert items[1].text == first_answer and len(items[0].image_hashes) == 2
    assert items[3].status == "incomplete" and len(items[3].text) < len(first_answer)


async def test_page_restores_history_after_reload(vision_server: RunningServer, page: Any, tmp_path: Path) -> None:
    """Needs GET /v1/conversations and GET /v1/conversations/{id}/items."""
    from playwright.async_api import expect

    async with httpx.AsyncClient() as http:
        listing = await http.get(f"http://127.0.0.1:{vision_server.port}/v1/conversations")
    assert listing.status_code == 200, "the page reads the list and the history from GET /v1/conversations[/{id}/items]"

    await page.goto(f"http://127.0.0.1:{vision_server.port}/")
    await expect(page.locator("#status")).to_have_text("Ready.")
    await attach(page, png_file(tmp_path, seed=5))
    await ask(page, "Describe the picture.")
    await wait_until_answered(page)
    answer = await page.locator(".message.assistant .text").text_content()
    conversation_id = conversation_id_of(page)
    await expect(page.locator(f'#conversations a[href="#{conversation_id}"]')).to_have_attribute(
        "aria-current", "page")

    await page.reload()
    await expect(page.locator("#status")).to_have_text("Ready.")
    messages = page.locator(".message")
    await expect(messages).to_have_count(2)
    await expect(messages.nth(0).locator("img")).to_have_count(1)
    await expect(messages.nth(0).locator(".text")).to_have_text("Describe the picture.")
    await expect(messages.nth(1).locator(".text")).to_have_text(answer)
    await expect(page.locator(f'#conversations a[href="#{conversation_id}"]')).to_have_count(1)
    await screenshot(page, "4-after-reload")

    # The reopened socket continues the same conversation.
    await ask(page, "And the colours?")
    await wait_until_answered(page, 2)
    assert len(vision_server.app.store.list_items(conversation_id)) == 4

    # A new conversation, then back to the first from the list.
    await page.get_by_role("button", name="New conversation").click()
    await expect(page.locator(".message")).to_have_count(0)
    await page.locator(f'#conversations a[href="#{conversation_id}"]').click()
    await expect(page.locator(".message")).to_have_count(4)


async def test_page_asks_for_a_key_and_uses_it(tiny_model: ChatModel, data_dir: Path, page: Any) -> None:
    from playwright.async_api import expect

    async with running_server(tiny_model, data_dir, temperature=0, auth="on", max_output_tokens=8) as server:
        key = Keys(server.app.store.engine).create("acme")[1]
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await expect(page.locator("#status")).to_have_text("This server needs an API key.")
        await expect(page.locator("#key-box")).to_have_attribute("open", "")

        await page.get_by_label("Key, kept in this browser").fill("sk-asst-wrong")
        await page.get_by_role("button", name="Save key").click()
        await expect(page.locator("#status")).to_have_text("The server refused this API key.")

        await expect(page.locator("#key-box")).to_have_attribute("open", "")
        await page.get_by_label("Key, kept in this browser").fill(key)
        await page.get_by_role("button", name="Save key").click()
        await expect(page.locator("#status")).to_have_text("Ready.")
        await ask(page, "Hello")
        await wait_until_answered(page)
        conversation_id = conversation_id_of(page)
        assert server.app.store.conversation_exists(conversation_id, "acme")
        assert not server.app.store.conversation_exists(conversation_id, "default")
        assert await page.evaluate("localStorage.getItem('assistant.key')") == key


async def test_page_resumes_an_answer_after_the_connection_drops(streaming_model: ChatModel, data_dir: Path,
                                                                 page: Any) -> None:
    """A proxy between page and server cuts the socket mid-answer: the page reconnects, the server replays what it
    missed, and the answer shown is the answer stored, whole."""
    from playwright.async_api import expect

    from tests.test_server_resume import CuttingProxy

    async with running_server(streaming_model, data_dir, temperature=0, max_output_tokens=1000) as server:
        proxy = CuttingProxy(server.port)
        await proxy.start()
        try:
            await page.goto(f"http://127.0.0.1:{proxy.port}/")
            await expect(page.locator("#status")).to_have_text("Ready.")
            await ask(page, "Tell me a long story.")
            await page.wait_for_function(
                "() => (document.querySelector('.message.assistant .text')?.textContent.length ?? 0) > 20")
            proxy.cut()
            await expect(page.locator("#status")).to_contain_text("Disconnected")
            await screenshot(page, "5-resuming")
            await wait_until_answered(page)
        finally:
            await proxy.close()
        answer = await page.locator(".message.assistant .text").text_content()
        [item] = [item for item in server.app.store.list_items(conversation_id_of(page)) if item.role == "assistant"]
        assert answer == item.text and len(answer) > 100
        await expect(page.locator(".message.assistant .error")).to_have_count(0)  # no "Interrupted"
