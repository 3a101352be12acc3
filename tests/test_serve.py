"""`diffmem serve`: the JSON API over the shipped lab model, its limits and queue, and the page in a real
headless browser (Debian's chromium + chromedriver through selenium)."""

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from diffmem.detect.calibration import Calibration
from diffmem.errors import DiffmemError
from diffmem.explain import SignificanceConfig, token_significance
from diffmem.explain.carrying_words import carrying_verdict, carrying_words
from diffmem.models.source import open_model, shipped_directory
from diffmem.serve import ExplanationServer, PromptExplainer
from diffmem.serve import explainer as explainer_module

MICRO_LAB = "builtin:lab-micro"
# A memorized caption of the micro lab model: flagged, its top word a trigger; replacing that word
# ("vyvelnev" -> "old") brings the score below the threshold (0.97 -> 0.53 on the shipped model).
MEMORIZED = (
    "the vyvelnev prasul poster: an orange dress at the top left and a white shirt at the bottom left"
    " on a teal background"
)


@pytest.fixture(scope="module")
def lab():
    return open_model(MICRO_LAB, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def threshold():
    return Calibration.load(shipped_directory(MICRO_LAB) / "calibration.json").threshold


@pytest.fixture
def serving(lab, threshold):
    """Start a server on a free port; yields a function that opens one with given explainer options."""
    servers = []

    def open_server(**options) -> ExplanationServer:
        explainer = PromptExplainer(
            lambda: lab, SignificanceConfig(), threshold, model_name=MICRO_LAB, **options
        )
        server = ExplanationServer(explainer, port=0)
        server.start()
        servers.append(server)
        return server

    yield open_server
    for server in servers:
        server.stop()


def request(server, path, body=None, raw=None):
    """(status, decoded JSON or text) of a GET, or of a POST of ``body`` as JSON or ``raw`` bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(
        server.url.rstrip("/") + path,
        data=data,
        method="GET" if data is None else "POST",
        headers={} if data is None else {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    return status, json.loads(text) if text.startswith("{") else text


def test_page_and_info_describe_the_model_and_its_calibrated_threshold(serving, threshold):
    server = serving()
    assert server.url.startswith("http://127.0.0.1:")
    status, page = request(server, "/")
    assert status == 200 and 'id="prompt"' in page and 'id="heatmap"' in page
    status, info = request(server, "/api/info")
    assert status == 200 and info["model"] == MICRO_LAB and info["threshold"] == threshold
    assert info["settings"]["first_steps"] == 1 and info["thumbnails"] is True
    assert info["settings"]["attribute_to"] == "prompt_embeds"


def test_explain_answers_the_score_flag_and_word_significance_of_token_significance(serving, lab, threshold):
    server = serving()
    status, answer = request(server, "/api/explain", {"prompt": MEMORIZED})
    expected = token_significance(lab, MEMORIZED, SignificanceConfig())
    assert status == 200
    assert answer["score"] == pytest.approx(expected.score, rel=1e-6)
    assert answer["flagged"] is (expected.score > threshold) is True
    assert [w["text"] for w in answer["words"]] == expected.words
    assert [(w["start"], w["end"]) for w in answer["words"]] == [tuple(s) for s in expected.word_spans]
    assert [w["significance"] for w in answer["words"]] == pytest.approx(expected.word_scores, rel=1e-5)
    assert answer["top_word"] == expected.words[expected.ranking()[0]] == "vyvelnev"
    found = carrying_words(lab, expected, threshold, SignificanceConfig().noise_norm_config())
    named = [expected.words[w] for w in found.words]
    assert answer["carrying"]["words"] == named and answer["carrying"]["scores"] == pytest.approx(
        found.scores
    )
    assert answer["carrying"]["text"] == carrying_verdict(named, found.scores)
    assert found.found and answer["carrying"]["text"].endswith("takes it under the threshold")
    status, picture = request(server, "/api/thumbnail", {"prompt": MEMORIZED})
    assert status == 200 and picture["png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_words_are_weighed_beyond_the_ordinary_prompts_measured_once_on_the_worker(lab, threshold):
    from diffmem.explain.ordinary_significance import OrdinarySignificance

    config = SignificanceConfig(attribute_to="word_replacement")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "base_seed"}
    ordinary = OrdinarySignificance({"teal": 10.0}, overall=0.05, prompts=7, origin="t", settings=settings)
    opened = []
    explainer = PromptExplainer(
        lambda: lab, config, threshold, ordinary=lambda denoiser: opened.append(denoiser) or ordinary
    )
    try:
        answer = explainer.explain(MEMORIZED)
    finally:
        explainer.close()
    expected = token_significance(lab, MEMORIZED, config, ordinary=ordinary)
    assert opened == [lab] and explainer.info()["settings"]["ordinary_prompts"] == 7
    assert [w["significance"] for w in answer["words"]] == pytest.approx(expected.word_scores, rel=1e-5)
    assert answer["words"][expected.words.index("teal")]["significance"] == 0.0


def test_bad_requests_get_a_clear_error_and_the_server_goes_on(serving):
    server = serving(thumbnails=False)
    cases = [
        ({"prompt": "   "}, None, 400, "empty"),
        ({"prompt": 7}, None, 400, "string"),
        ({"prompt": "x" * 2001}, None, 400, "longer than 2000"),
        (None, b"not json", 400, "not JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
        (None, b'{"prompt": "' + b"a" * 20000 + b'"}', 413, "larger than"),
    ]
    for body, raw, code, message in cases:
        status, answer = request(server, "/api/explain", body, raw)
        assert status == code and message in answer["error"]
    assert request(server, "/api/thumbnail", {"prompt": "a red bag"})[0] == 400  # thumbnails are off
    assert request(server, "/api/nothing", {"prompt": "a"})[0] == 404
    assert request(server, "/etc/passwd")[0] == 404
    assert request(server, "/api/explain", {"prompt": "a red bag"})[0] == 200


def _slow_significance(log):
    """A stand-in for token_significance that records how many calls overlap."""
    real = token_significance
    running = [0]
    lock = threading.Lock()

    def significance(*args, **kwargs):
        with lock:
            running[0] += 1
            log.append(running[0])
        time.sleep(0.3)
        try:
            if args[1] == "fail":
                raise RuntimeError("the model broke")
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    return significance


def test_requests_queue_for_the_model_one_at_a_time(serving, monkeypatch):
    overlaps = []
    monkeypatch.setattr(explainer_module, "token_significance", _slow_significance(overlaps))
    server = serving(max_pending=8)
    statuses = []
    threads = [
        threading.Thread(
            target=lambda: statuses.append(request(server, "/api/explain", {"prompt": "a red bag"})[0])
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4 and len(overlaps) == 4 and max(overlaps) == 1


def test_a_full_queue_answers_503_and_a_model_failure_500(serving, monkeypatch):
    calls = []
    monkeypatch.setattr(explainer_module, "token_significance", _slow_significance(calls))
    server = serving(max_pending=1)
    first = threading.Thread(target=request, args=(server, "/api/explain", {"prompt": "a red bag"}))
    first.start()
    while not calls:
        time.sleep(0.01)
    status, answer = request(server, "/api/explain", {"prompt": "a blue bag"})
    first.join()
    assert status == 503 and "busy" in answer["error"]
    status, answer = request(server, "/api/explain", {"prompt": "fail"})
    assert status == 500 and "the model broke" in answer["error"]
    assert request(server, "/api/explain", {"prompt": "a green bag"})[0] == 200


def test_a_port_in_use_is_a_one_line_error(lab):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DiffmemError, match="cannot listen on 127.0.0.1"):
            ExplanationServer(PromptExplainer(lambda: lab), port=taken.getsockname()[1])


def test_the_page_in_a_real_browser_scores_explains_and_compares_an_edit(
    serving, threshold, tmp_path, browser
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = serving()
    wait = WebDriverWait(browser, 30)
    browser.get(server.url)
    wait.until(lambda b: "threshold" in b.find_element(By.ID, "model").text)
    rows = lambda b: b.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys(MEMORIZED)
    browser.find_element(By.ID, "explain").click()
    wait.until(lambda b: len(rows(b)) == 1)
    assert browser.find_element(By.ID, "verdict").text.startswith(f"above the threshold {threshold:.3f}")
    assert browser.find_element(By.ID, "carrying").text.endswith("takes it under the threshold")
    words = browser.find_elements(By.CSS_SELECTOR, "#heatmap .word")
    assert " ".join(w.text for w in words).startswith("the vyvelnev prasul poster")
    hottest = max(words, key=lambda w: float(w.get_attribute("data-share")))
    assert hottest.text == "vyvelnev"
    wait.until(lambda b: b.execute_script("return document.getElementById('thumbnail').naturalWidth") > 0)
    first_score = browser.find_element(By.ID, "score").text

    hottest.click()  # selects the word in the prompt box, so typing replaces it
    box.send_keys("old" + Keys.ENTER)
    wait.until(lambda b: len(rows(b)) == 2)
    assert box.get_attribute("value") == MEMORIZED.replace("vyvelnev", "old")
    assert browser.find_element(By.ID, "score").text != first_score
    assert browser.find_element(By.ID, "verdict").text.startswith("below the threshold")
    assert browser.find_element(By.ID, "carrying").text == ""  # nothing to take under
    newest = rows(browser)[0]
    assert [m.text for m in newest.find_elements(By.TAG_NAME, "mark")] == ["old"]
    assert newest.find_element(By.CSS_SELECTOR, ".down").text.startswith("-")
    browser.save_screenshot(str(tmp_path / "page.png"))
