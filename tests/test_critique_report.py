"""The critique's HTML report in a real browser: headless Chromium (Debian's, driven by Playwright) opens
it, every image loads, and nothing lands on the console. Skipped where Chromium is not installed
(`bash scripts/setup.sh --tests` installs it)."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the machine's closed network needs: no background connections, no first-run or sync traffic
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed (bash scripts/setup.sh --tests installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_report_renders_in_chromium_with_images_and_no_console_errors(browser, classifier, tmp_path):  # noqa: F811
    from lmlab.critique import critique

    report = critique(
        classifier["ckpt"], tmp_path / "out", data=classifier["flipped"], progress=False, options={"n_resamples": 100}
    )
    page = browser.new_page()
    messages, failures = [], []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: failures.append(r.url[:80]))
    page.goto((tmp_path / "out" / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert page.title().startswith("lmlab critique:")
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert images and all(done and w > 0 and h > 0 for done, w, h in images), images
    ran = [name for name, lens in report["lenses"].items() if "skipped" not in lens]
    for name in report["lenses"]:  # every lens has its section, ran or skipped
        assert page.locator(f"section#{name} h2").count() == 1, name
    assert {"performance", "interpret", "bias", "robustness", "efficiency"} <= set(
        ran
    )  # a classifier: no text to generate
    assert page.locator("section#safety .skip").count() == 1  # skipped, with the note saying why
    assert page.locator(".finding.bad").count() >= 1  # the planted bad slice shows
    assert page.locator("section#performance table.metric tr").count() > 3  # every number, with its sentence
    assert not messages and not failures, (messages, failures)
    page.close()
