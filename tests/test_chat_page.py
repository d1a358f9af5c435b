"""The chat page at / in a real headless browser (Debian's chromium through Selenium): a message gets a streamed
reply with its statistics, a second reply is stopped mid-way and stays in the conversation as far as it got.
Skipped where no chromium and chromedriver are installed (`apt-get install chromium chromium-driver`)."""
from __future__ import annotations

import shutil
import socket
import threading

import pytest

import offload
from offload.demo import demo_model

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium/chromedriver: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def base_url():
    import uvicorn
    from offload.server import ServerOptions, create_app

    from test_server import wait_until_up

    model = offload.load(demo_model(), device="cpu", max_context=512)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, ServerOptions("demo_model")), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_until_up(base)
    yield base
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as error:  # a browser that cannot start here is no verdict on the page
        pytest.skip(f"chromium did not start: {str(error).splitlines()[0]}")
    yield driver
    driver.quit()


def test_the_page_streams_a_reply_and_stops_one(base_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base_url + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "demo_model")
    browser.execute_script("document.getElementById('max-tokens').value = 24;"
                           "document.getElementById('temperature').value = 0;")
    browser.find_element(By.ID, "input").send_keys("What is a list comprehension?")
    browser.find_element(By.ID, "send").click()
    replies = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
    first = wait.until(lambda d: replies(d) and replies(d)[0].get_attribute("data-done") and replies(d)[0])
    assert first.get_attribute("data-done") == "complete"
    assert "tok/s decode" in first.text and "prompt cache" in first.text
    assert first.text.split("\n")[0].strip(), "the reply is empty"
    assert browser.find_element(By.ID, "stats").text

    # A long reply (the requests now ask the server to ignore eos), stopped once it is streaming.
    browser.execute_script("""
        document.getElementById('max-tokens').value = 400;
        const plainFetch = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body) init.body = JSON.stringify({...JSON.parse(init.body), ignore_eos: true});
          return plainFetch(url, init);
        };""")
    browser.find_element(By.ID, "input").send_keys("Tell me everything about Python's data model.")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(replies(d)) == 2 and len(replies(d)[1].text) > 10)
    browser.find_element(By.ID, "stop").click()
    second = wait.until(lambda d: replies(d)[1].get_attribute("data-done") and replies(d)[1])
    assert second.get_attribute("data-done") == "stopped" and "stopped" in second.text
    assert browser.find_element(By.ID, "send").is_enabled()
    # The conversation goes on, the stopped reply included.
    turns = browser.execute_script("return conversation.map(m => m.role)")
    assert turns == ["user", "assistant", "user", "assistant"]
