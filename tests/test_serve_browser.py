"""The web chat page end to end, in headless Chromium driven by Selenium: a reply streams into its
bubble in pieces, equals what the API answers for the same conversation, and follow-ups and
Regenerate work. Optional: skipped unless selenium, /usr/bin/chromium and /usr/bin/chromedriver are
all there (on Debian: apt-get install -y chromium chromium-driver; pip install selenium). Also: a long chat over a
short context drops its oldest exchanges and goes on, a stream cut short is labelled "interrupted",
and attached pictures are shrunk."""

import json
import os
import tempfile

import httpx
import pytest
from conftest import LiveServer, tiny_chat_dir

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
        pytest.skip(
            f"browser test: {_path} is missing (apt-get install chromium chromium-driver)", allow_module_level=True
        )

# Chromium's flags: headless as root in a container, and no calls home (which only time out here).
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
]

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


# Picks a picture (a Blob) in the page's file input, as a person would, and resolves with the
# preview image once the page has read it in.
PICK = """
async function pick(blob) {
  const input = document.getElementById("image"), transfer = new DataTransfer();
  transfer.items.add(new File([blob], "picture.png", {type: "image/png"}));
  input.files = transfer.files;
  input.dispatchEvent(new Event("change"));
  const preview = document.getElementById("preview-img");
  while (!preview.getAttribute("src")) await new Promise((resolve) => setTimeout(resolve, 20));
  return preview;
}
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
    for flag in [*FLAGS, f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        open_page(driver, live.url)
        yield driver
        errors = [
            e["message"]
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
        ]
        assert errors == [], f"the page logged errors: {errors}"
    finally:
        driver.quit()
        profile.cleanup()


# -- helpers ---------------------------------------------------------------------------------------


def wait(driver, condition, timeout=20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    driver.execute_script(RECORDER)


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
    assert (
        text.strip() == api_reply(live, [{"role": "user", "content": question}], temperature=0, max_tokens=12).strip()
    )


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
    conversation = [
        {"role": "user", "content": "the cat sat on the mat"},
        {"role": "assistant", "content": reply_text(browser, first)},
        {"role": "user", "content": "and the dog?"},
    ]
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


def test_long_chat_drops_the_oldest_exchange(browser, live, tmp_path):
    # A 128-token context holds about two exchanges of these messages (37 tokens each, plus the
    # template's and the replies' tokens): from the third on, the page must drop the oldest exchange
    # and ask again, say so in a note, and the reply must be the API's for what is left.
    model_dir = tiny_chat_dir(tmp_path / "short-chat", max_len=128)
    message = "the cat sat on the mat. the dog ran. " * 2
    with LiveServer(build_server(model_dir, max_batch=2)) as short:
        open_page(browser, short.url)
        try:
            settings(browser, temperature=0, max_tokens=8)
            for i in range(5):
                last = send(browser, f"{i} {message}")
            notes = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#messages .note")]
            assert notes and all("dropped to fit the model's context" in n for n in notes), notes
            kept = browser.find_elements(By.CSS_SELECTOR, "#messages .message:not(.dropped)")
            assert len(kept) < 10 and kept[-1] == last
            conversation = [
                {
                    "role": "user" if "user" in b.get_attribute("class") else "assistant",
                    "content": reply_text(browser, b),
                }
                for b in kept
            ]
            assert conversation[0]["role"] == "user"
            assert (
                conversation[-1]["content"].strip()
                == api_reply(short, conversation[:-1], temperature=0, max_tokens=8).strip()
            )

            # A message too long on its own: every older exchange goes, then it is refused, shown as
            # not sent, and left out of the history, so the next message works.
            browser.execute_script("document.getElementById('input').value = arguments[0]", message * 4)
            browser.find_element(By.ID, "send").click()
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.error"))
            unsent = browser.find_elements(By.CSS_SELECTOR, "#messages .message.user")[-1]
            assert unsent.get_dom_attribute("data-unsent") == "true"
            assert "context" in browser.find_element(By.CSS_SELECTOR, "#messages .message.error").text
            assert browser.find_elements(By.CSS_SELECTOR, "#messages .message:not(.dropped):not(.error)") == [unsent]
            wait(browser, lambda d: d.find_element(By.ID, "send").is_enabled())
            after = send(browser, "hi")
            assert after.get_dom_attribute("data-finish-reason") in ("stop", "length")
            assert (
                reply_text(browser, after).strip()
                == api_reply(short, [{"role": "user", "content": "hi"}], temperature=0, max_tokens=8).strip()
            )
        finally:
            # The refused requests are logged as failed loads: expected here, nothing else is.
            logged = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            open_page(browser, live.url)
        assert all("status of 400" in m for m in logged), logged


# Replaces the page's fetch for chat requests: the answer is a stream that sends one piece of text
# and then ends without "data: [DONE]" (cleanly, or with a network error), or a 503 error answer.
FAKE_FETCH = """
const how = arguments[0];
window.realFetch = window.realFetch || window.fetch;
window.fetch = async (path, options) => {
  if (!String(path).endsWith("/chat/completions")) return window.realFetch(path, options);
  if (how === "503") {
    const error = {
      error: {message: "the server is shutting down", type: "server_error", param: null, code: "shutting_down"},
    };
    return new Response(JSON.stringify(error), {status: 503, headers: {"Content-Type": "application/json"}});
  }
  const chunk = {choices: [{index: 0, delta: {content: "half a rep"}, finish_reason: null}]};
  const body = new ReadableStream({start(controller) {
    controller.enqueue(new TextEncoder().encode("data: " + JSON.stringify(chunk) + "\\n\\n"));
    // later, so that the text is read first (an error discards what is still queued)
    setTimeout(() => how === "close" ? controller.close() : controller.error(new TypeError("network error")), 50);
  }});
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""


def test_cut_stream_is_interrupted_and_503_is_shown(browser, live):
    new_chat(browser)
    try:
        for how in ("close", "error"):
            browser.execute_script(FAKE_FETCH, how)
            bubble = send(browser, "hello")
            assert bubble.get_dom_attribute("data-finish-reason") == "interrupted"
            assert reply_text(browser, bubble) == "half a rep"
            assert "interrupted" in bubble.find_element(By.CSS_SELECTOR, ".meta").text
        browser.execute_script(FAKE_FETCH, "503")
        browser.find_element(By.ID, "input").send_keys("are you there?")
        browser.find_element(By.ID, "send").click()
        error = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.error"))[0]
        assert error.text == "the server is shutting down"
    finally:
        browser.execute_script("if (window.realFetch) window.fetch = window.realFetch")
        new_chat(browser)


def test_attached_picture_is_shrunk(browser, live):
    # A 1600x1000 PNG of noise (several MB) becomes a 768x480 JPEG; a small PNG stays a PNG as it is.
    # Both go through the file input's change handler, as a picked file would.
    shrink = (
        PICK
        + """
    const [width, height, noisy, done] = arguments;
    (async () => {
      const canvas = Object.assign(document.createElement("canvas"), {width, height});
      const ctx = canvas.getContext("2d");
      const pixels = ctx.createImageData(width, height);
      for (let i = 0; i < pixels.data.length; i++) {
        pixels.data[i] = i % 4 === 3 ? 255 : noisy ? Math.random() * 256 : 128;
      }
      ctx.putImageData(pixels, 0, 0);
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
      const preview = await pick(blob);
      await preview.decode();
      done({url: preview.src.slice(0, 22), length: preview.src.length, file: blob.size,
            width: preview.naturalWidth, height: preview.naturalHeight});
    })().catch((e) => done({error: String(e)}));
    """
    )
    browser.set_script_timeout(30)
    try:
        big = browser.execute_async_script(shrink, 1600, 1000, True)
        assert big["url"] == "data:image/jpeg;base64" and (big["width"], big["height"]) == (768, 480), big
        assert big["length"] < big["file"] / 4, big
        browser.find_element(By.ID, "remove-image").click()
        small = browser.execute_async_script(shrink, 300, 200, False)
        assert small["url"] == "data:image/png;base64," and (small["width"], small["height"]) == (300, 200), small
    finally:
        browser.find_element(By.ID, "remove-image").click()


def test_a_vision_model_answers_about_an_attached_picture(browser, live, tmp_path):
    """Over a tiny vision-language model: the picture control shows, a picture picked in it travels
    with the message, and the streamed reply equals the API's answer to the very request the page
    sent (recorded from its fetch)."""
    from tests.test_vlm_training import tiny_vlm_dir
    from tinylm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        ["What colour is the shape? It is red.", "这个图形是什么颜色的？它是红色的。"] * 20, vocab_size=300
    )
    with LiveServer(build_server(tiny_vlm_dir(tmp_path / "vlm", tokenizer), max_batch=2)) as vlm:
        try:
            open_page(browser, vlm.url)
            assert browser.find_element(By.ID, "image").find_element(By.XPATH, "..").is_displayed()
            browser.execute_script("""
              window.sent = [];
              const original = window.fetch;
              window.fetch = (url, options = {}) => {
                if (String(url).endsWith('/v1/chat/completions')) window.sent.push(options.body);
                return original(url, options);
              };""")
            settings(browser, temperature=0, max_tokens=10)
            browser.set_script_timeout(30)
            browser.execute_async_script(
                PICK
                + """
              const done = arguments[0];
              const canvas = Object.assign(document.createElement("canvas"), {width: 64, height: 64});
              const ctx = canvas.getContext("2d");
              ctx.fillStyle = "white"; ctx.fillRect(0, 0, 64, 64);
              ctx.fillStyle = "red"; ctx.beginPath(); ctx.arc(32, 32, 20, 0, 7); ctx.fill();
              canvas.toBlob((blob) => pick(blob).then(() => done()), "image/png");"""
            )
            bubble = send(browser, "What colour is the shape?")
            body = json.loads(browser.execute_script("return window.sent[window.sent.length - 1]"))
            parts = body["messages"][-1]["content"]
            assert sorted(p["type"] for p in parts) == ["image_url", "text"]
            body.update(stream=False)
            body.pop("stream_options", None)
            response = httpx.post(vlm.url + "/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert reply_text(browser, bubble).strip() == response.json()["choices"][0]["message"]["content"].strip()
        finally:
            open_page(browser, live.url)  # back to the module's server for any test after this one
