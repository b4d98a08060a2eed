"""The chat page (belle_edge/serve/page.html) in a real headless Chromium against a real server: a Chinese
message typed and sent, the streamed reply equal to the engine's greedy one, per-turn stats, a second turn that
carries the history. Skipped (with the reason printed) where Chromium, its driver or selenium is missing."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
_missing = [what for what, ok in ((CHROMIUM, os.path.exists(CHROMIUM)), (CHROMEDRIVER, os.path.exists(CHROMEDRIVER)),
                                  ("selenium", importlib.util.find_spec("selenium") is not None),
                                  ("fastapi", importlib.util.find_spec("fastapi") is not None),
                                  ("uvicorn", importlib.util.find_spec("uvicorn") is not None)) if not ok]
if _missing:
    _reason = f"the chat page test needs {', '.join(_missing)} (apt-get install chromium chromium-driver; " \
              "pip install selenium 'belle_edge[serve]')"
    print(f"test_chat_page.py skipped: {_reason}", file=sys.stderr)
    pytest.skip(_reason, allow_module_level=True)

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from belle_edge.runtime.engine import BatchEngine, EngineConfig  # noqa: E402
from belle_edge.serve.app import create_app  # noqa: E402
from conftest import serving  # noqa: E402

FIRST, SECOND = "你好，请介绍一下你自己", "我想查询一下物流信息。"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="belle-chromium-") as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1000,800", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def _replies(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('.reply')].map(e => e.textContent)")


def _send(driver, text: str, turns: int) -> None:
    """Type ``text``, press Send, wait for the ``turns``-th reply to be complete."""
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    assert box.get_attribute("value") == text  # Chinese reaches the page intact
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
        and len(d.find_elements(By.CLASS_NAME, "stats")) == turns
        and d.find_elements(By.CLASS_NAME, "stats")[-1].text.strip())


def test_chat_page_streams_a_chinese_conversation(browser, tiny_llama_model):
    engine = BatchEngine(tiny_llama_model, EngineConfig(max_batch=2))
    with serving(create_app(engine, model_name="tiny-llama")) as url:
        first = {"messages": [{"role": "user", "content": FIRST}], "temperature": 0, "max_tokens": MAX_TOKENS}
        expected = httpx.post(f"{url}/v1/chat/completions", json=first, timeout=60).json()
        expected = expected["choices"][0]["message"]["content"]
        assert expected
        # what the page's second turn must give: the same two requests, in order, to an engine of its own
        with BatchEngine(tiny_llama_model, EngineConfig(max_batch=1)) as mirror:
            assert "".join(mirror.submit(first["messages"], max_tokens=MAX_TOKENS)) == expected
            history = first["messages"] + [{"role": "assistant", "content": expected},
                                           {"role": "user", "content": SECOND}]
            expected_second = "".join(mirror.submit(history, max_tokens=MAX_TOKENS))

        browser.get(url + "/")
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
        limit = browser.find_element(By.ID, "max-tokens")
        limit.clear()
        limit.send_keys(str(MAX_TOKENS))

        _send(browser, FIRST, turns=1)
        assert _replies(browser) == [expected]
        stats = browser.find_elements(By.CLASS_NAME, "stats")[-1].text
        assert "TTFT" in stats and f"{MAX_TOKENS} tokens" in stats and "tok/s" in stats, stats
        log = browser.find_element(By.ID, "log").text
        assert FIRST in log

        hits = engine.metrics().reuse_hits
        _send(browser, SECOND, turns=2)
        assert _replies(browser) == [expected, expected_second]
        assert engine.metrics().reuse_hits == hits + 1  # the page sent the whole history; the server continued it
        assert browser.find_element(By.ID, "message").get_attribute("value") == ""


def test_chat_page_sends_the_api_key_it_is_given(browser, tiny_llama_model):
    engine = BatchEngine(tiny_llama_model, EngineConfig(max_batch=1))
    with serving(create_app(engine, model_name="tiny-llama", api_key="page-key")) as url:
        browser.get(url + "/")
        limit = browser.find_element(By.ID, "max-tokens")
        limit.clear()
        limit.send_keys(str(MAX_TOKENS))
        _send(browser, "你好", turns=1)  # no key yet: refused, and said so
        assert "401" in browser.find_elements(By.CLASS_NAME, "stats")[-1].text
        assert browser.find_elements(By.CSS_SELECTOR, ".reply.error")
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        _send(browser, "你好", turns=2)
        stats = browser.find_elements(By.CLASS_NAME, "stats")[-1].text
        assert "TTFT" in stats and "tokens" in stats, stats
        assert _replies(browser)[-1]


def test_chat_page_pins_notes_and_refuses_a_line_that_is_not_one(browser, tiny_llama_model):
    """Notes typed as "key：value" lines reach the server as its notes field: the reply equals the engine's
    own with those notes; a line without a colon is named on the page and nothing is sent."""
    notes = {"订单号": "DD542841036648", "尺码": "XL"}
    with BatchEngine(tiny_llama_model, EngineConfig(max_batch=1)) as mirror:
        messages = [{"role": "user", "content": FIRST}]
        with_notes = "".join(mirror.submit(messages, max_tokens=MAX_TOKENS, notes=notes))
        without = "".join(mirror.submit(messages, max_tokens=MAX_TOKENS, notes={}))
    assert with_notes != without  # else the check below could not tell whether the notes were sent

    engine = BatchEngine(tiny_llama_model, EngineConfig(max_batch=1))
    with serving(create_app(engine, model_name="tiny-llama")) as url:
        browser.get(url + "/")
        limit = browser.find_element(By.ID, "max-tokens")
        limit.clear()
        limit.send_keys(str(MAX_TOKENS))
        box = browser.find_element(By.ID, "notes")
        box.send_keys("订单号 DD542841036648")
        browser.find_element(By.ID, "message").send_keys(FIRST)
        browser.find_element(By.ID, "send").click()
        error = browser.find_element(By.ID, "notes-error").text
        assert error == 'notes, line 1: expected key：value, got "订单号 DD542841036648"', error
        assert not browser.find_elements(By.CLASS_NAME, "reply")  # nothing sent, the message kept
        assert browser.find_element(By.ID, "message").get_attribute("value") == FIRST

        box.clear()
        box.send_keys("订单号：DD542841036648\n尺码: XL")
        browser.find_element(By.ID, "message").clear()
        _send(browser, FIRST, turns=1)
        assert _replies(browser) == [with_notes]
        assert browser.find_element(By.ID, "notes-error").text == ""
