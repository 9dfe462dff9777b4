"""The call log pages on Flask's test client: access, headers, escaping, structure,
pagination and filters, with calls placed through the signed webhooks."""

from __future__ import annotations

import base64
import json
import logging
import re
from html.parser import HTMLParser

import pytest

from ivr import create_app
from ivr.web import records

from ..fakes.openai_server import CallTool, Fail, Reply
from ..twilio_sim import TwilioCall

PASSWORD = "correct horse battery staple"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
CALLER = "+15551234567"


@pytest.fixture
def admin_app(config):
    return create_app({**config, "ADMIN_PASSWORD": PASSWORD})


@pytest.fixture
def web(admin_app):
    return admin_app.test_client()


def place_call(client, *lines, caller=CALLER, hang_up=True) -> TwilioCall:
    call = TwilioCall(client, caller=caller)
    call.start()
    for words in lines:
        call.say(words)
    if hang_up:
        call.hang_up()
    return call


class Page(HTMLParser):
    """The page's elements by class, and its text: enough to assert on structure."""

    def __init__(self, html: str):
        super().__init__()
        self.classes: dict[str, list[str]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("meta", "link", "input", "br"):
            return
        self._open.append((tag, (attrs.get("class") or "").split()))
        for name in self._open[-1][1]:
            self.classes.setdefault(name, []).append("")

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for _, names in self._open:
            for name in names:
                self.classes[name][-1] += data

    def text(self, name: str) -> list[str]:
        return [" ".join(t.split()) for t in self.classes.get(name, [])]

    def links(self) -> list[str]:
        return [a["href"] for tag, a in self.tags if tag == "a" and "href" in a]


def get_page(web, url: str) -> Page:
    response = web.get(url, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return Page(response.get_data(as_text=True))


# -- access ------------------------------------------------------------------------------


def test_pages_and_metrics_do_not_exist_without_an_admin_password(client):
    for path in (
        "/calls",
        "/calls/CA123",
        "/calls/CA123.json",
        "/metrics",
        "/calls/static/style.css",
    ):
        with client.get(path, headers=AUTH) as response:
            assert response.status_code == 404, path


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(f"root:{PASSWORD}".encode()).decode()},
        {"Authorization": "Bearer " + PASSWORD},
        # The right user and password, but not in Basic: only Basic credentials count.
        {"Authorization": f'Digest username="admin", password="{PASSWORD}"'},
        {"Authorization": f'Auth username="admin", password="{PASSWORD}"'},
    ],
)
def test_without_the_credentials_every_route_asks_for_them(web, headers):
    for path in ("/calls", "/calls/CA123", "/calls/CA123.json", "/metrics"):
        response = web.get(path, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="ivr call log"')
        assert PASSWORD not in response.get_data(as_text=True)


def test_admin_user_is_configurable(config):
    app = create_app({**config, "ADMIN_PASSWORD": PASSWORD, "ADMIN_USER": "owner"})
    token = base64.b64encode(f"owner:{PASSWORD}".encode()).decode()
    web = app.test_client()
    assert web.get("/calls", headers={"Authorization": "Basic " + token}).status_code == 200
    assert web.get("/calls", headers=AUTH).status_code == 401


def test_every_page_sends_strict_security_headers(web):
    call = place_call(web, "hello")
    paths = ("/calls", f"/calls/{call.sid}", f"/calls/{call.sid}.json", "/metrics")
    for path in (*paths, "/calls/static/style.css"):
        with web.get(path, headers=AUTH) as response:
            assert response.status_code == 200, path
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "style-src 'self'" in csp
            assert "script-src" not in csp and "unsafe-inline" not in csp
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Cache-Control"] == "no-store"


# -- the list --------------------------------------------------------------------------------


def test_a_call_shows_up_in_the_list_with_its_caller_masked(web, fake_openai):
    call = place_call(web, "What are your opening hours?", "Thanks, bye")
    response = web.get("/calls", headers=AUTH)
    html = response.get_data(as_text=True)
    page = Page(html)
    assert CALLER not in html and "4567" in html
    assert page.text("caller") == ["+1•••••4567"]
    assert page.text("is-live") == []  # it ended
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    assert "caller-hung-up" in cells[5]
    assert re.sub(r"\s+", " ", cells[4]).strip() == "2"  # turns: two caller lines
    assert "ms" in cells[6]  # worst wait
    assert f"/calls/{call.sid}" in page.links()
    assert not any(meta for tag, meta in page.tags if tag == "meta" and "http-equiv" in meta)


def test_full_numbers_only_on_request_and_never_in_a_url(web):
    place_call(web, "hi")
    revealed = web.get("/calls?reveal=1", headers=AUTH).get_data(as_text=True)
    page = Page(revealed)
    assert page.text("caller") == [CALLER]
    assert all("5551234567" not in link for link in page.links())


def test_a_live_call_is_marked_and_the_page_refreshes_itself(web):
    live = place_call(web, "still talking", hang_up=False)
    page = get_page(web, "/calls")
    assert [m for t, m in page.tags if t == "meta" and m.get("http-equiv") == "refresh"]
    assert page.text("is-live")
    detail = get_page(web, f"/calls/{live.sid}")
    assert [m for t, m in detail.tags if t == "meta" and m.get("http-equiv") == "refresh"]
    live.hang_up()
    assert not [m for t, m in get_page(web, "/calls").tags if m.get("http-equiv") == "refresh"]


def test_pages_newest_first(web, monkeypatch):
    monkeypatch.setattr(records, "PER_PAGE", 5)
    sids = [place_call(web, caller=f"+1555000{n:04d}").sid for n in range(7)]
    first = get_page(web, "/calls")
    second = get_page(web, "/calls?page=2")
    assert first.text("caller")[0].endswith("0006")
    assert len(first.text("caller")) == 5 and len(second.text("caller")) == 2
    assert second.text("caller")[-1].endswith("0000")
    assert "/calls?page=2" in first.links() and "/calls?page=2" not in second.links()
    assert f"/calls/{sids[0]}" in second.links()


def test_filters_by_end_reason_mode_and_last_digits(web, fake_openai):
    place_call(web, "hello", caller="+15550001111")
    fake_openai.queue(CallTool("end_call"))
    place_call(web, "goodbye now", caller="+15550002222", hang_up=False)
    place_call(web, caller="+15550003333", hang_up=False)

    def callers(query):
        return get_page(web, "/calls?" + query).text("caller")

    assert callers("ended=ended-by-agent") == ["+1•••••2222"]
    assert callers("ended=caller-hung-up") == ["+1•••••1111"]
    assert callers("ended=live") == ["+1•••••3333"]
    assert callers("digits=3333") == ["+1•••••3333"]
    # Only the last four digits count: a full number typed in finds the same call.
    assert callers("digits=15550003333") == ["+1•••••3333"]
    assert callers("mode=gather") == ["+1•••••3333", "+1•••••2222", "+1•••••1111"]
    assert callers("mode=stream") == []
    assert "No calls match" in web.get("/calls?mode=stream", headers=AUTH).get_data(as_text=True)


# -- one call ---------------------------------------------------------------------------------


def test_the_timeline_shows_both_sides_timings_tools_and_the_end(web, fake_openai):
    fake_openai.queue(
        Fail(500),
        Reply("We open at nine."),
        CallTool("end_call", content=None),
    )
    call = TwilioCall(web, caller=CALLER)
    call.start()
    call.say("When do you open?")
    call.say("mumble", confidence=0.2)
    call.say("<script>alert(1)</script> bye")
    page = get_page(web, f"/calls/{call.sid}")
    who = page.text("who")
    assert who[:2] == ["agent", "caller"]
    texts = page.text("text")
    assert "When do you open?" in texts and "We open at nine." in texts
    timing = page.text("timing")
    retried = r"answered in [\d.]+ m?s, LLM [\d.]+ m?s, 2 attempts \(1 retry\)"
    assert any(re.search(retried, t) for t in timing)
    assert "caller (unclear)" in who
    assert any("confidence 0.20" in f for f in page.text("facts"))
    assert any("end_call" in t for t in page.text("tool-call"))
    assert any("end_call" in t and "ending" in t for t in page.text("tool-result"))
    assert page.text("end-reason") == ["ended-by-agent"]
    html = web.get(f"/calls/{call.sid}", headers=AUTH).get_data(as_text=True)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; bye" in html
    assert CALLER not in html


def test_the_json_download_holds_the_same_timeline(web, fake_openai):
    call = place_call(web, "hello there")
    response = web.get(f"/calls/{call.sid}.json", headers=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert "attachment" in response.headers["Content-Disposition"]
    data = json.loads(response.get_data())
    assert data["call"]["sid"] == call.sid
    assert data["call"]["caller"] == "+1•••••4567"
    assert data["call"]["end_reason"] == "caller-hung-up"
    roles = [line["role"] for line in data["timeline"]]
    assert roles == ["assistant", "user", "assistant"]
    assert data["timeline"][2]["timing"]["attempts"] == 1
    revealed = web.get(f"/calls/{call.sid}.json?reveal=1", headers=AUTH)
    assert json.loads(revealed.get_data())["call"]["caller"] == CALLER


def _strict_json(response) -> dict:
    """The body parsed as strict JSON: `NaN`, `Infinity` and `-Infinity` are refused."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(response.get_data(), parse_constant=refuse)


# "inf" and "nan" never compared below the threshold, so they were taken already.
@pytest.mark.parametrize("score", ["-inf", "-Infinity"])
def test_a_non_finite_confidence_is_taken_as_absent(web, fake_openai, score):
    fake_openai.queue(Reply("We open at nine."))
    call = TwilioCall(web, caller=CALLER)
    call.start()
    answered = call.post_action(SpeechResult="When do you open?", Confidence=score)
    # Absent confidence means the words are taken: answered, not reprompted as unclear.
    assert "We open at nine." in [s.text for s in answered.iter("Say")]
    call.hang_up()
    data = _strict_json(web.get(f"/calls/{call.sid}.json", headers=AUTH))
    heard = [line for line in data["timeline"] if line["role"] == "user"]
    assert [line["text"] for line in heard] == ["When do you open?"]
    assert all("confidence" not in line for line in data["timeline"])


def test_a_low_finite_confidence_is_still_recorded_in_the_download(web, fake_openai):
    call = TwilioCall(web, caller=CALLER)
    call.start()
    call.say("mumble", confidence=0.2)
    call.hang_up()
    data = _strict_json(web.get(f"/calls/{call.sid}.json", headers=AUTH))
    assert [line.get("confidence") for line in data["timeline"] if "confidence" in line] == [0.2]


def test_a_stored_non_finite_number_never_reaches_the_download(web, admin_app, fake_openai):
    """A record written before such scores were refused still downloads as strict JSON."""
    call = place_call(web, "hello there")
    store = admin_app.extensions["ivr"].store
    store.append(call.sid, "caller_unclear", "mumble", "gather", confidence=float("-inf"))
    data = _strict_json(web.get(f"/calls/{call.sid}.json", headers=AUTH))
    unclear = [line for line in data["timeline"] if line["text"] == "mumble"]
    assert len(unclear) == 1 and "confidence" not in unclear[0]


def test_an_unknown_call_is_404(web):
    assert web.get("/calls/CA" + "f" * 32, headers=AUTH).status_code == 404
    assert web.get("/calls/not-a-sid!", headers=AUTH).status_code == 404


def test_the_index_forgets_calls_past_their_retention(web, redis, admin_app):
    place_call(web, "old call")
    retention = admin_app.extensions["ivr"].settings.transcript_retention
    ((sid, started),) = redis.zrange("ivr:calls", 0, -1, withscores=True)
    redis.zadd("ivr:calls", {sid: started - retention - 10})
    place_call(web, "new call")
    assert redis.zcard("ivr:calls") == 1


def test_a_streamed_call_shows_its_latency_and_why_it_fell_back(
    live, stream_config, fake_openai, redis
):
    from ..fakes.twilio_media import TwilioMediaClient
    from ..twilio_sim import AUTH_TOKEN
    from ..waiting import wait_for

    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.answers = ["Welcome to the bakery.", "We have rye today."]
    call = TwilioCall(live.app.test_client(), caller=CALLER)
    root = call.start()
    parameters = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
    media = TwilioMediaClient(
        live.ws + "/media-stream", AUTH_TOKEN, call.sid, parameters=parameters
    ).start()
    media.talk([("silence", 600), ("speech", 400), ("silence", 600)])
    store = live.app.extensions["ivr"].store
    assert wait_for(lambda: len(store.transcript(call.sid)) >= 3)
    fake_openai.realtime.drop_after_seconds = 0  # the model goes away
    media.talk([("silence", 100)])
    assert media.wait_closed(timeout=5)
    call.post("/stream-ended")

    web = create_app({**stream_config, "ADMIN_PASSWORD": PASSWORD}).test_client()
    data = json.loads(web.get(f"/calls/{call.sid}.json", headers=AUTH).get_data())
    assert data["call"]["modes"] == ["gather", "stream", "fallback"]
    answer = next(line for line in data["timeline"] if line["text"] == "We have rye today.")
    assert answer["mode"] == "stream" and answer["latency_ms"] >= 0
    (switch,) = [line for line in data["timeline"] if line["role"] == "event"]
    assert switch["text"].startswith("Gather mode: model connection lost")
    assert data["call"]["worst_ms"] >= answer["latency_ms"]
    page = get_page(web, f"/calls/{call.sid}")
    assert any("first audio" in t for t in page.text("timing"))


def test_the_report_delivery_state_is_shown(config, fake_openai):
    import responses

    from ..waiting import wait_for

    hook = "https://hooks.example.com/calls"
    app = create_app(
        {
            **config,
            "ADMIN_PASSWORD": PASSWORD,
            "END_OF_CALL_WEBHOOK_URL": hook,
            "END_OF_CALL_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 24).decode(),
            "END_OF_CALL_RETRY_SECONDS": "0.01",
        }
    )
    web = app.test_client()
    with responses.RequestsMock() as receiver:
        try:
            receiver.post(hook, status=200)
            delivered = place_call(web, "hello", caller="+15550001111")
            store = app.extensions["ivr"].store
            assert wait_for(lambda: store.meta(delivered.sid).get("report") == "delivered")
            receiver.replace(responses.POST, hook, status=400)
            refused = place_call(web, "hello", caller="+15550002222")
            assert wait_for(lambda: store.meta(refused.sid).get("report") == "refused")
        finally:
            app.extensions["ivr"].close()  # its sender stops while the mock still answers
    assert get_page(web, f"/calls/{delivered.sid}").text("report") == ["delivered"]
    assert get_page(web, f"/calls/{refused.sid}").text("report") == ["refused"]


# -- hostile input: guessing, plain http, absurd pages -----------------------------------

# The platform's router is every request's peer; the client is the hop it appended.
ROUTER = {"REMOTE_ADDR": "10.1.2.3"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def from_client(addr: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": addr, "X-Forwarded-Proto": "https", **(headers or {})}


def test_a_guesser_is_held_off_after_ten_failures_a_minute_on_every_worker(config, redis):
    # Two apps on one Redis: two workers (or dynos) share one count.
    workers = [create_app({**config, "ADMIN_PASSWORD": PASSWORD}).test_client() for _ in range(2)]
    for worker in workers:
        worker.environ_base.update(ROUTER)
    guesser = "203.0.113.7"
    for n in range(10):
        response = workers[n % 2].get(
            "/calls", headers=from_client(guesser, basic("admin", f"guess-{n}-password"))
        )
        assert response.status_code == 401, n
    # The eleventh try is not checked at all, even with the right password.
    for worker in workers:
        response = worker.get("/calls", headers=from_client(guesser, AUTH))
        assert response.status_code == 429
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert PASSWORD not in response.get_data(as_text=True)
    assert 0 < redis.ttl(f"ivr:admin:failures:{guesser}") <= 60
    # The owner, from another address behind the same router, still gets in.
    owner = workers[0].get("/calls", headers=from_client("198.51.100.2", AUTH))
    assert owner.status_code == 200


def test_a_few_mistakes_and_visits_without_credentials_do_not_lock_the_owner_out(web):
    for _ in range(20):  # a browser's first request of a visit has no credentials
        assert web.get("/calls").status_code == 401
    for n in range(9):
        assert web.get("/calls", headers=basic("admin", f"typo-{n}-password")).status_code == 401
    assert web.get("/calls", headers=AUTH).status_code == 200


def test_sign_in_still_works_with_redis_down(config, caplog):
    # Nothing listens on port 1: every count fails; the password check needs no Redis.
    app = create_app({**config, "ADMIN_PASSWORD": PASSWORD, "REDIS_URL": "redis://127.0.0.1:1"})
    web = app.test_client()
    with caplog.at_level(logging.WARNING, logger="ivr"):
        assert web.get("/metrics", headers=AUTH).status_code == 200
        assert web.get("/metrics", headers=basic("admin", "not-the-password")).status_code == 401
    assert "sign-in failure" in caplog.text


def test_over_https_the_pages_ask_browsers_to_stay_on_https(web):
    call = place_call(web, "hello")
    for path in ("/calls", f"/calls/{call.sid}", f"/calls/{call.sid}.json", "/metrics"):
        response = web.get(path, headers={**AUTH, "X-Forwarded-Proto": "https"})
        assert response.status_code == 200, path
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_plain_http_through_the_router_is_sent_to_https_before_any_sign_in(web):
    response = web.get(
        "/calls?mode=gather&page=1",
        headers={"X-Forwarded-Proto": "http", "X-Forwarded-Host": "agent.example.com"},
    )
    assert response.status_code == 308
    assert response.headers["Location"] == "https://agent.example.com/calls?mode=gather&page=1"
    assert "WWW-Authenticate" not in response.headers  # no password asked over http
    metrics = web.get("/metrics", headers={"X-Forwarded-Proto": "http"})
    assert metrics.status_code == 308
    assert metrics.headers["Location"] == "https://localhost/metrics"


def test_local_development_over_plain_http_still_works(web):
    response = web.get("/calls", headers=AUTH)  # http://localhost, no proxy
    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response.headers


def test_with_an_https_public_base_url_plain_http_goes_there_not_to_a_forwarded_host(config):
    app = create_app(
        {**config, "ADMIN_PASSWORD": PASSWORD, "PUBLIC_BASE_URL": "https://calls.example.org"}
    )
    web = app.test_client()
    for headers in ({}, {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example"}):
        response = web.get("/calls?page=2", headers={**AUTH, **headers})
        assert response.status_code == 308
        assert response.headers["Location"] == "https://calls.example.org/calls?page=2"
    # Over https the page is served, the spoofed host changing nothing.
    secure = web.get(
        "/calls",
        headers={**AUTH, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
    )
    assert secure.status_code == 200
    assert "evil.example" not in secure.get_data(as_text=True)


@pytest.mark.parametrize(
    "page", ["0", "-1", "00", "abc", "1.5", "", "99999999999999999999", str(10**20), "2"]
)
def test_a_page_out_of_range_is_404_never_500(web, page):
    place_call(web, "hello")  # one call: one page
    assert web.get(f"/calls?page={page}", headers=AUTH).status_code == 404
    assert web.get(f"/calls?mode=gather&page={page}", headers=AUTH).status_code == 404


def test_the_first_page_is_there_with_or_without_calls(web):
    assert web.get("/calls", headers=AUTH).status_code == 200
    assert web.get("/calls?page=1", headers=AUTH).status_code == 200
    place_call(web, "hello")
    assert get_page(web, "/calls?page=1").text("caller") == ["+1•••••4567"]
