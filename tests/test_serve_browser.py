"""The web chat page end to end, in headless Chromium driven by Selenium: a reply streams into its
bubble in pieces, equals what the API answers for the same conversation, and follow-ups and
Regenerate work. Optional: skipped unless selenium, /usr/bin/chromium and /usr/bin/chromedriver are
all there (on Debian: apt-get install -y chromium chromium-driver; pip install selenium)."""

import os
import tempfile

import httpx
import pytest

from tests.conftest import LiveServer, tiny_chat_dir
from tinylm.serve.app import build_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:
    pytest.skip("browser test: selenium is not installed (pip install selenium)", allow_module_level=True)
for _path in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(_path):
        pytest.skip(f"browser test: {_path} is missing (apt-get install chromium chromium-driver)", allow_module_level=True)

# Chromium's flags: headless as root in a container, and no calls home (which only time out here).
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900"]

# Records what the page draws into assistant bubbles: for every change of a bubble's text, the text
# set (read from the mutation record itself, so no change is missed however fast the reply comes),
# whether the bubble was already marked done, and which observer callback saw it. The page sets the
# text once per SSE delta; the observer is called again only after the page awaited its next read of
# the response body, so texts seen in different callbacks came in different reads.
RECORDER = """
window.drawn = [];
let callback = 0;
new MutationObserver((records) => {
  callback += 1;
  for (const r of records) {
    if (!r.target.classList.contains("text")) continue;
    const bubble = r.target.closest(".message.assistant");
    if (!bubble) continue;
    const text = Array.from(r.addedNodes, (n) => n.data || "").join("");
    window.drawn.push({text, done: bubble.dataset.done === "true", callback});
  }
}).observe(document.getElementById("messages"), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # 512 positions: the streaming reply (100 tokens) and a three-turn conversation must fit.
    model_dir = tiny_chat_dir(tmp_path_factory.mktemp("browser") / "tiny-chat", max_len=512)
    with LiveServer(build_server(model_dir, max_batch=4)) as server:
        yield server


@pytest.fixture(scope="module")
def browser(live):
    profile = tempfile.TemporaryDirectory(prefix="tinylm-chromium-", ignore_cleanup_errors=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(live.url + "/")
        wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        driver.execute_script(RECORDER)
        yield driver
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
        assert errors == [], f"the page logged errors: {errors}"
    finally:
        driver.quit()
        profile.cleanup()


# -- helpers ---------------------------------------------------------------------------------------


def wait(driver, condition, timeout=20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def assistant_bubbles(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def reply_text(driver, bubble):
    """The reply exactly as drawn: the textContent of the bubble's text part (not its info line)."""
    return driver.execute_script("return arguments[0].querySelector('.text').textContent", bubble)


def settings(driver, **values):
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))


def new_chat(driver):
    driver.find_element(By.ID, "new-chat").click()
    driver.execute_script("window.drawn = []")
    assert assistant_bubbles(driver) == []


def finished(driver, bubble):
    """Wait for ``bubble``'s reply to finish; no error bubble may have appeared."""
    wait(driver, lambda d: bubble.get_dom_attribute("data-done") == "true")
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .message.error") == []
    return bubble


def send(driver, text):
    """Type ``text``, press Send and return the new assistant bubble once its reply finished."""
    before = len(assistant_bubbles(driver))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(assistant_bubbles(d)) == before + 1)
    return finished(driver, assistant_bubbles(driver)[-1])


def api_reply(live, messages, **sampling):
    response = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, **sampling}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


# -- tests -----------------------------------------------------------------------------------------


def test_reply_equals_the_api(browser, live):
    new_chat(browser)
    settings(browser, temperature=0, max_tokens=12)
    question = "你好 世界"
    bubble = send(browser, question)
    text = reply_text(browser, bubble)
    assert text.strip() != ""
    assert bubble.get_dom_attribute("data-finish-reason") in ("stop", "length")
    assert text.strip() == api_reply(live, [{"role": "user", "content": question}], temperature=0, max_tokens=12).strip()


def test_reply_streams_in_pieces(browser, live):
    # Polling the bubble from Python would race the tiny model (100 tokens take about 0.2 s), so
    # the page itself records every text it draws (RECORDER). Two things must hold: the bubble showed
    # growing partial replies, each a prefix of the final one, before it was marked done; and those
    # partial texts came in more than one network read, so the server did not hold the reply back.
    new_chat(browser)
    settings(browser, temperature=0, max_tokens=100)
    bubble = send(browser, "hi")
    final = reply_text(browser, bubble)
    drawn = browser.execute_script("return window.drawn")
    partial = [d for d in drawn if d["text"] and d["text"] != final]
    assert len({d["text"] for d in partial}) >= 2, f"the reply was not drawn in pieces: {drawn}"
    assert all(final.startswith(d["text"]) and not d["done"] for d in partial), drawn
    assert len({d["callback"] for d in drawn if d["text"]}) >= 2, f"the whole reply came in one read: {drawn}"


def test_follow_up_and_regenerate(browser, live):
    new_chat(browser)
    settings(browser, temperature=0, max_tokens=12)
    first = send(browser, "the cat sat on the mat")
    second = send(browser, "and the dog?")
    assert len(assistant_bubbles(browser)) == 2
    conversation = [{"role": "user", "content": "the cat sat on the mat"},
                    {"role": "assistant", "content": reply_text(browser, first)},
                    {"role": "user", "content": "and the dog?"}]
    expected = api_reply(live, conversation, temperature=0, max_tokens=12).strip()
    assert reply_text(browser, second).strip() == expected

    # Regenerate: the last bubble is replaced by a new one (the count stays), which finishes; at
    # temperature 0 it says the same again.
    wait(browser, lambda d: d.find_element(By.ID, "regenerate").is_enabled())
    browser.find_element(By.ID, "regenerate").click()
    wait(browser, staleness_of(second))  # removed from the page
    bubbles = assistant_bubbles(browser)
    assert len(bubbles) == 2 and bubbles[0] == first
    regenerated = finished(browser, bubbles[-1])
    assert regenerated.get_dom_attribute("data-finish-reason") in ("stop", "length")
    assert reply_text(browser, regenerated).strip() == expected
