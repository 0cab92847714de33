"""The playground page in a real browser (Debian's chromium driven by Playwright): a question
typed in gets a streamed answer with its TTFT and tokens/s, and the server stats update."""

from __future__ import annotations

import os
import re
import shutil

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_page_and_assets_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert httpx.get(server.url + asset).status_code == 200
    # Nothing is loaded from elsewhere (no CDN): every src/href is local or inline.
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert links and all(u.startswith(("/", "data:")) for u in links), links
    assert "fetch(\"http" not in httpx.get(server.url + "/static/app.js").text


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (make test installs it: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_chat_streams_an_answer_and_stats_update(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'",
                           timeout=30_000)
    page.wait_for_function(
        "document.getElementById('model-name').textContent === 'smollm2-135m'", timeout=30_000)
    generated_before = int(page.text_content("#stat-gen-tokens").replace(",", ""))

    # Greedy and short, so the answer is known and quick.
    page.evaluate("""() => {
        for (const [id, v] of [["temperature", "0"], ["max-tokens", "32"]]) {
            const el = document.getElementById(id);
            el.value = v;
            el.dispatchEvent(new Event("input"));
        }
        window.contentUpdates = 0;
        new MutationObserver((records) => {
            for (const r of records) {
                if (r.target.classList && r.target.classList.contains("content")
                    && r.target.parentElement.classList.contains("assistant")) {
                    window.contentUpdates++;
                }
            }
        }).observe(document.getElementById("messages"), {childList: true, subtree: true});
    }""")
    assert page.text_content("#temperature-value") == "0.00"
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#prompt", "Name the capital city of France.")
    page.press("#prompt", "Enter")

    answer = page.locator(".msg.assistant").last
    answer.locator(".meta").wait_for(timeout=240_000)
    text = answer.locator(".content").text_content()
    assert "Paris" in text
    assert page.locator(".msg.user .content").last.text_content() == \
        "Name the capital city of France."
    assert page.evaluate("window.contentUpdates") > 3  # token by token, not at the end
    ttft = float(answer.get_attribute("data-ttft-ms"))
    tps = float(answer.get_attribute("data-tps"))
    tokens = int(answer.get_attribute("data-tokens"))
    assert ttft > 0 and tps > 0 and 1 < tokens <= 32
    assert answer.get_attribute("data-finish") in ("stop", "length")
    meta = answer.locator(".meta").text_content()
    assert "TTFT" in meta and "tok/s" in meta

    # The stats panel polls /metrics: the generated-token counter catches up.
    page.wait_for_function(
        f"Number(document.getElementById('stat-gen-tokens').textContent.replace(/,/g, ''))"
        f" >= {generated_before + tokens}", timeout=10_000)
    assert page.text_content("#stat-running") == "0"
    assert page.text_content("#stat-kv").endswith("%")
    path = tmp_path / "playground.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    print(f"playground screenshot: {path}")
    assert not errors, errors
    page.close()


def test_model_picker_lists_the_models_and_sends_the_picked_one(browser, tmp_path_factory):
    from peregrine.config import EngineConfig
    from peregrine.server.app import create_app
    from peregrine.server.args import ServerArgs
    from peregrine.server.model_entries import ModelEntry

    from tests.conftest import tiny_config_dir
    from tests.server.conftest import serve

    tiny = EngineConfig(model=tiny_config_dir(tmp_path_factory, vocab_size=49152),
                        load_format="dummy", kv_cache_memory=0.05)
    entries = [ModelEntry("smol", EngineConfig(kv_cache_memory=0.1)), ModelEntry("tiny", tiny)]
    args = ServerArgs(embedding_model=None, keep_alive=0)
    with serve(args, app=create_app(args, entries[0].config, entries)) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_function(
            "document.querySelectorAll('#model-picker option').length === 2", timeout=30_000)
        options = page.eval_on_selector_all("#model-picker option", "os => os.map(o => o.value)")
        assert options == ["smol", "tiny"]
        assert "unloaded" in page.text_content("#model-picker option[value=tiny]")
        page.select_option("#model-picker", "tiny")
        assert page.text_content("#model-name") == "tiny"
        page.evaluate("""() => {
            const el = document.getElementById("max-tokens");
            el.value = "16";
            el.dispatchEvent(new Event("input"));
        }""")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.locator(".msg.assistant .meta").last.wait_for(timeout=120_000)
        # the answer came from tiny, which loaded for it
        finished = [line for line in httpx.get(s.url + "/metrics").text.splitlines()
                    if line.startswith("peregrine:request_success_total")]
        assert any('model_name="tiny"' in line for line in finished), finished
        assert not any('model_name="smol"' in line for line in finished), finished
        page.close()
