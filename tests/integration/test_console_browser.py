"""The review console in a real browser (Debian's headless Chromium driven by Selenium) against a running Verdict
(`verdict api`, gunicorn) and a real worker: a reviewer signs in, sees the item a worker sent to review, decides it
by keyboard, and the client gets the final decision by poll and by a signed `review.decided` webhook; another
tenant's reviewer never sees the item; a page without a session redirects to sign-in; a form without its CSRF token is
refused. The run keeps screenshots of the queue and of an item page in docs/img/ (so they stay current).

Chromium and chromedriver come from `make browser` (ops/ensure-browser.sh). Without them the test is skipped on a
developer's machine and fails under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from app.db import Database
from tests.conftest import TenantKey, issue_key
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, worker_env
from tests.integration.processes import free_port, stop_process_group, wait_healthy
from tests.integration.webhook_support import receiver
from tests.lanes import integration_fixture
from tests.webhook_receiver import WebhookReceiver

__all__ = ["receiver"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "img"
VERDICT = str(Path(sys.executable).parent / "verdict")
WEBHOOK_ENV = {"WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "WEBHOOK_RETRY_SCHEDULE": "1,1,1",
               "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5", "WEBHOOK_TIMEOUT_SECONDS": "2"}


def _browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "headless Chromium and chromedriver are needed: run `make browser` (ops/ensure-browser.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return chromium, driver


@integration_fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1366,1500", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.implicitly_wait(0)
    try:
        yield chrome
    finally:
        chrome.quit()


class ApiServer:
    """A real `verdict api` (gunicorn) on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.base_url = f"http://127.0.0.1:{free_port()}"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [VERDICT, "api", "--bind", self.base_url.removeprefix("http://"), "--workers", "1"], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.process, self.base_url, log_path)

    def stop(self) -> None:
        stop_process_group(self.process)


# Every visible form control has an accessible name (a <label>, aria-label or aria-labelledby): screen readers can
# tell what each field is for.
UNLABELLED = """
return Array.from(document.querySelectorAll('input, select, textarea, button, meter'))
  .filter(e => e.type !== 'hidden' && e.offsetParent !== null)
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby')
               && !(e.tagName === 'BUTTON' && e.textContent.trim()))
  .map(e => e.outerHTML.slice(0, 120));
"""


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_a_reviewer_decides_in_the_browser_what_a_worker_sent_to_review(
    browser: Any, database_url: str, redis_url: str, database: Database, tenant: TenantKey,
    other_tenant: TenantKey, fake_upstream: FakeUpstream, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    env = openai_worker_env(fake_upstream, **WEBHOOK_ENV)
    start_worker(**env)
    api = ApiServer(worker_env(database_url, redis_url, **env), tmp_path / "api.log")
    http = httpx.Client(base_url=api.base_url, headers=tenant.headers, timeout=30)
    try:
        endpoint = http.post("/v1/webhooks", json={"url": receiver.url,
                                                   "events": ["review.decided"]}).json()
        reviewer = issue_key(database, tenant_name=tenant.tenant_name, scopes=("review",), key_name="Ann Reviewer")
        stranger = issue_key(database, tenant_name=other_tenant.tenant_name, scopes=("review",), key_name="Sam")

        # A conversation: the user's question (allowed), and the model's answer, which the upstream scores in the
        # review band.
        question = http.post("/v1/submissions", json={"input": "what did you think of my essay?", "role": "input",
                                                      "conversation_id": "c-essay", "turn_id": "t1"}).json()
        answer = http.post("/v1/submissions", json={"input": "honestly, that was a stupid essay", "role": "output",
                                                    "conversation_id": "c-essay", "turn_id": "t1"}).json()
        for accepted in (question, answer):
            wait_until(lambda a=accepted: http.get(f"/v1/submissions/{a['id']}?wait=2").json()["status"]
                       == "completed", "the worker's verdict")
        assert http.get(f"/v1/submissions/{answer['id']}").json()["verdict"]["decision"] == "review"

        # No session: every page sends the browser to sign-in.
        browser.get(f"{api.base_url}/console/queue")
        assert browser.current_url.startswith(f"{api.base_url}/console/sign-in")
        browser.find_element(By.ID, "key").send_keys(reviewer.plaintext + Keys.ENTER)
        wait_until(lambda: browser.current_url.startswith(f"{api.base_url}/console/queue"), "the queue")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-row]")
        assert len(rows) == 1 and answer["id"] not in browser.page_source  # the queue lists items, not texts
        assert browser.find_element(By.CSS_SELECTOR, '[data-count="pending"]').text == "1"
        assert reviewer.plaintext not in browser.page_source
        session_cookie = browser.get_cookie("verdict_console")
        assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert browser.execute_script(UNLABELLED) == []
        browser.find_element(By.TAG_NAME, "body").send_keys("j")  # keyboard: select the first row
        assert browser.switch_to.active_element.get_attribute("class") == "row-link"
        browser.save_screenshot(str(SCREENSHOTS / "console-queue.png"))

        # `n` claims the next item and opens it; the text and the input that led to it are on the page.
        browser.find_element(By.TAG_NAME, "body").send_keys("n")
        wait_until(lambda: "/console/reviews/" in browser.current_url, "the item page")
        page = browser.find_element(By.ID, "main").text
        assert "honestly, that was a stupid essay" in page
        assert "what did you think of my essay?" in page and "the input this answers" in page
        assert browser.find_element(By.ID, "claim-timer").is_displayed()
        assert browser.execute_script(UNLABELLED) == []
        assert len(browser.find_elements(By.CSS_SELECTOR, "table.scores meter")) >= 1
        browser.find_element(By.TAG_NAME, "body").send_keys("b")  # block, then the reason
        assert browser.switch_to.active_element.get_attribute("id") == "reason"
        assert browser.find_element(By.ID, "decision-block").is_selected()
        browser.switch_to.active_element.send_keys("insults the user's work")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SCREENSHOTS / "console-item.png"))
        browser.switch_to.active_element.send_keys(Keys.CONTROL, Keys.ENTER)
        wait_until(lambda: "msg=queue_empty" in browser.current_url, "the queue, empty now")

        # The client: the final decision by poll and by a signed webhook with the same payload.
        polled = http.get(f"/v1/submissions/{answer['id']}").json()
        assert polled["final_decision"] == "block" and polled["verdict"]["decision"] == "review"
        assert polled["review"]["decided_by"] == reviewer.key_id
        [delivered] = receiver.wait_for(1)
        payload = Webhook(endpoint["secret"]).verify(delivered.body, delivered.headers)
        assert payload["type"] == "review.decided" and payload["data"] == polled

        # The submission page: verdict, review, the delivery and its attempt, every audit step.
        def delivered_shown() -> bool:
            browser.get(f"{api.base_url}/console/submissions/{answer['id']}")
            return bool(browser.find_elements(By.CSS_SELECTOR,
                                              'tr[data-event="review.decided"][data-status="succeeded"]'))

        wait_until(delivered_shown, "the delivery on the submission page")
        assert browser.find_element(By.ID, "final-decision").text == "block"
        audit = browser.find_element(By.ID, "audit").text
        for action in ("submission.received", "verdict.decided", "review.created", "review.claimed",
                       "review.viewed", "review.decided"):
            assert action in audit, action

        # A form without its CSRF token is refused, and changes nothing.
        browser.get(f"{api.base_url}/console/queue")
        browser.execute_script("document.querySelector('#claim-next-form input[name=csrf_token]').remove();"
                               "document.getElementById('claim-next-form').submit();")
        wait_until(lambda: "Refused" in browser.title, "the refusal")
        assert "security token" in browser.find_element(By.ID, "main").text

        # Another tenant's reviewer: an empty queue, and the item's page is not found.
        browser.find_element(By.CSS_SELECTOR, "form[action='/console/sign-out'] button").click()
        wait_until(lambda: "/console/sign-in" in browser.current_url, "signed out")
        browser.get(f"{api.base_url}/console/queue")
        assert "/console/sign-in" in browser.current_url  # the old session is gone
        browser.find_element(By.ID, "key").send_keys(stranger.plaintext + Keys.ENTER)
        wait_until(lambda: browser.current_url.startswith(f"{api.base_url}/console/queue"), "the stranger's queue")
        browser.get(f"{api.base_url}/console/queue?status=all")
        assert browser.find_elements(By.CSS_SELECTOR, "tr[data-row]") == []
        review_id = polled["review"]["id"]
        browser.get(f"{api.base_url}/console/reviews/{review_id}")
        assert "No such review item" in browser.page_source and "stupid essay" not in browser.page_source
    finally:
        http.close()
        api.stop()
