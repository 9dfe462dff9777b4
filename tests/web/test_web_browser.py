"""The call log as its owner uses it: a real headless Chromium against the app on a
loopback server, with calls placed through the signed webhooks.

Screenshots of each page are saved in the test's temporary folder.
"""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from ivr import create_app

from ..conftest import LiveServer
from ..fakes.openai_server import CallTool, Fail, Reply
from ..twilio_sim import TwilioCall

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

PASSWORD = "browser-test-password"
CALLER = "+15557654321"
# No network beyond loopback, no first-run chores, a profile of its own.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory, monkeypatch_module):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.skip("chromium and chromedriver are not installed (scripts/test installs them)")
    # Selenium must use the system's driver and browser, never fetch its own.
    monkeypatch_module.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # The network log says what status each page came with.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.execute_cdp_cmd("Network.enable", {})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def sign_in(driver, password: str | None) -> None:
    """What the browser's Basic-auth prompt does: send the credentials with each request."""
    headers = {}
    if password is not None:
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})


@pytest.fixture
def server(config):
    live = LiveServer(create_app({**config, "ADMIN_PASSWORD": PASSWORD}))
    yield live
    live.stop()


def test_the_owner_signs_in_finds_the_call_and_reads_its_timeline(
    server, chromium, fake_openai, tmp_path
):
    webhooks = server.app.test_client()
    fake_openai.queue(
        Fail(503),
        Reply("We open at nine tomorrow, and close at six."),
        Reply("Of course. Anything else?"),
        CallTool("end_call"),
    )
    call = TwilioCall(webhooks, caller=CALLER)
    call.start()
    call.say("Hi, what time do you open tomorrow?")
    call.say("uh mm", confidence=0.21)
    call.say("<script>alert('hi')</script> please read that back")
    call.say("That's all, thanks. Bye!")
    call.hang_up()
    live = TwilioCall(webhooks, caller="+15550009876")
    live.start()
    live.say("Hello?")

    sign_in(chromium, PASSWORD)
    chromium.get(server.http + "/calls")
    assert chromium.title.startswith("Calls")
    chromium.save_screenshot(str(tmp_path / "calls.png"))
    callers = [c.text for c in chromium.find_elements(By.CSS_SELECTOR, "td.caller")]
    assert callers == ["+1•••••9876", "+1•••••4321"]
    assert CALLER not in chromium.page_source
    live_rows = chromium.find_elements(By.CSS_SELECTOR, "tr.is-live td.caller")
    assert [c.text for c in live_rows] == ["+1•••••9876"]

    row = chromium.find_elements(By.CSS_SELECTOR, "table.calls tbody tr")[1]
    assert "ended-by-agent" in row.text
    row.find_element(By.TAG_NAME, "a").click()
    assert chromium.current_url == f"{server.http}/calls/{call.sid}"
    chromium.set_window_size(1280, 1500)
    chromium.save_screenshot(str(tmp_path / "call.png"))

    lines = chromium.find_elements(By.CSS_SELECTOR, "ol.timeline li")
    who = [li.find_element(By.CLASS_NAME, "who").text for li in lines]
    assert who[:3] == ["agent", "caller", "agent"]
    texts = [li.find_element(By.CLASS_NAME, "what").text for li in lines]
    assert "Hi, what time do you open tomorrow?" in texts[1]
    assert "We open at nine" in texts[2] and "2 attempts (1 retry)" in texts[2]
    assert any("uh mm" in t and "confidence 0.21" in t for t in texts)
    # The caller's markup is text on the page: shown, never run.
    assert any("<script>alert('hi')</script> please read that back" in t for t in texts)
    assert chromium.find_elements(By.TAG_NAME, "script") == []
    with pytest.raises(NoAlertPresentException):
        chromium.switch_to.alert.text  # noqa: B018
    assert any("end_call" in t for t in texts)
    assert chromium.find_element(By.CSS_SELECTOR, "dd.end-reason").text == "ended-by-agent"
    assert chromium.find_element(By.CSS_SELECTOR, "h1 .caller").text == "+1•••••4321"
    chromium.set_window_size(1280, 1000)


def statuses(driver, url: str) -> list[int]:
    """HTTP statuses the browser received for `url` since the last call."""
    found = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"] == url:
                found.append(response["status"])
    return found


def test_without_the_password_the_browser_gets_401(server, chromium):
    TwilioCall(server.app.test_client(), caller=CALLER).start()
    chromium.get_log("performance")  # drop what earlier tests left
    for password in (None, "wrong password"):
        sign_in(chromium, password)
        chromium.get(server.http + "/calls")
        assert statuses(chromium, server.http + "/calls") == [401]
        assert chromium.find_elements(By.CSS_SELECTOR, "table.calls") == []
        assert "4321" not in chromium.page_source


def test_without_an_admin_password_there_are_no_pages(config, chromium):
    server = LiveServer(create_app(config))
    try:
        sign_in(chromium, PASSWORD)
        chromium.get_log("performance")
        for path in ("/calls", "/metrics"):
            chromium.get(server.http + path)
            assert statuses(chromium, server.http + path) == [404]
    finally:
        server.stop()
