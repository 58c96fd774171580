"""The web console in a real browser: Debian's chromium, driven by Selenium through Debian's
chromedriver (no browser download). A real storescu send to a real daemon, then a radiologist
logs in, finds the patient's name and accession at the top of the worklist, opens the study by
clicking its row, sees its overlay load, turns the overlay off and on, opens the full-size film,
and finds that view in the study's audit story; an admin finds it in the audit trail.

``CXR_WEB_SCREENSHOTS=DIR`` saves the worklist and study pages as PNGs there (docs/console.md's are
made this way: ``CXR_WEB_SCREENSHOTS=docs python -m pytest tests/web/test_web_browser.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import StoreSCP, require_tool, storescu
from conftest import wait_until as _wait
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from helpers_web import WebConsole, add_user

PASSWORD = "radiologist-pw-1"


def _driver(tmp_path: Path):
    chromium = require_tool("chromium", "chromium")
    chromedriver = require_tool("chromedriver", "chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        msg = "selenium not installed: pip install '.[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1366,900",
                "--disable-extensions", "--no-first-run", "--password-store=basic",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    d = webdriver.Chrome(service=service, options=opts)
    d.set_page_load_timeout(30)
    return d


def _lateral(path: Path) -> Path:
    """The same kind of film, marked as a lateral view (which cxr-node does not analyse)."""
    from pydicom import dcmread

    ds = dcmread(path)
    ds.ViewPosition = "LL"
    ds.save_as(path, enforce_file_format=True)
    return path


def _exam(path: Path, name: str, accession: str) -> Path:
    """What a modality writes for a reader: patient name, accession, description, station name."""
    from pydicom import dcmread

    ds = dcmread(path)
    ds.PatientName, ds.AccessionNumber = name, accession
    ds.StudyDescription, ds.StationName = "XR CHEST PA", "CR ROOM 2"
    ds.save_as(path, enforce_file_format=True)
    return path


def _loaded(driver, img):
    """[naturalWidth, naturalHeight] once the image has loaded, else None."""
    return driver.execute_script(
        "const i = arguments[0]; return i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight]"
        " : null;", img)


def _add_admin(config: Path) -> None:
    from cxr_node.config import load
    from cxr_node.db.session import Database
    from cxr_node.web import users

    db = Database(load(config).database.url)
    users.add(db, "ada", "admin", PASSWORD)
    db.dispose()


def _shot(driver, path: Path) -> None:
    """A screenshot as a small PNG (256-colour palette) for docs/console.md."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)




def test_a_radiologist_sees_the_urgent_study_first_and_its_overlay(node_factory, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _driver(tmp_path)  # skips (or fails under CI) before anything starts
    web = None
    try:
        with StoreSCP(tmp_path / "pacs") as pacs:
            ckpt = make_checkpoint(tmp_path / "flag-all.pt", input_size=64, thresholds={"COVID": 0.0})
            node = node_factory("web", quiet_seconds=1, extra=(
                f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[outbox]\npoll_seconds = 0.3\n'
                f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
                f"port = {pacs.port}\n")).start()
            urgent, unreadable = uid(), uid()
            films = [_exam(make_cr(tmp_path / "u1.dcm", study_uid=urgent, rows=1100, cols=1000, seed=1,
                                   patient_id="PAT-0042"), "Doe^Jane", "ACC-0042"),
                     _exam(_lateral(make_cr(tmp_path / "u2.dcm", study_uid=urgent, rows=320, cols=320, seed=2,
                                            patient_id="PAT-0042")), "Doe^Jane", "ACC-0042")]
            assert storescu(node.port, *films, aet="CR-ROOM-2").returncode == 0
            # a later study whose only film is refused: newer, but no priority, so below the urgent one
            noise = make_cr(tmp_path / "n.dcm", study_uid=unreadable, rows=320, cols=320, pixels="random",
                            patient_id="PAT-0043")
            assert storescu(node.port, noise, aet="DX-WARD-5").returncode == 0

            def done() -> bool:
                with node.db() as db:
                    processed = db.execute("select count(*) from studies where state = 'processed'").fetchone()[0]
                    sent = db.execute("select count(*) from outbox where state = 'sent'").fetchone()[0]
                return processed == 2 and sent == 3  # the urgent study's SC and SR, the other's SR
            _wait(done, 120, "both studies processed and their results sent")

            add_user(node.config, "rita", "radiologist", PASSWORD)
            _add_admin(node.config)
            web = WebConsole(node.config, tmp_path / "web.log").start()
            shots = os.environ.get("CXR_WEB_SCREENSHOTS")

            driver.get(web.url + "/")
            assert "/login" in driver.current_url
            driver.find_element(By.NAME, "username").send_keys("rita")
            driver.find_element(By.NAME, "password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login").click()
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "table.worklist tbody tr"), 20, "the worklist")
            rows = driver.find_elements(By.CSS_SELECTOR, "table.worklist tbody tr")
            assert len(rows) == 2
            top = rows[0]
            # the row names the patient and the exam as a reader does, not by UID
            assert top.find_element(By.CSS_SELECTOR, ".study-link").text == "Doe, Jane"
            assert top.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "urgent"
            text = top.text
            for expected in ("PAT-0042", "ACC-0042", "2026-11-23", "XR CHEST PA", "CR ROOM 2",
                             "2 films: 1 analysed, 1 not analysed", "UTC"):
                assert expected in text, (expected, text)
            assert urgent not in text  # no 64-character UID to read
            finding = top.find_element(By.CSS_SELECTOR, "td.finding").text
            assert finding.startswith("COVID ") and finding.endswith("%")
            assert top.find_element(By.CSS_SELECTOR, ".delivery").text == "sent"
            assert "PAT-0043" in rows[1].text and "1 film, not analysed" in rows[1].text
            # a 1366 px screen shows every column without a horizontal scroll bar (page or table)
            widths = driver.execute_script(
                "const t = document.querySelector('table.worklist'), f = t.parentElement;"
                "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                " f.scrollWidth, f.clientWidth, t.getBoundingClientRect().right, window.innerWidth];")
            assert widths[0] <= widths[1] and widths[2] <= widths[3] and widths[4] <= widths[5], widths
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                _shot(driver, Path(shots) / "web-worklist.png")

            top.find_element(By.CSS_SELECTOR, "td.accession").click()  # the row opens the study
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "img.overlay"), 20, "the study page")
            assert driver.current_url.endswith(f"/study/{urgent}")
            img = driver.find_element(By.CSS_SELECTOR, "img.overlay")
            page_size = _wait(lambda: _loaded(driver, img), 30, "the overlay image to load")
            assert page_size[1] > page_size[0]  # the film plus its legend strip below
            page = driver.find_element(By.TAG_NAME, "main").text
            assert "Doe, Jane" in driver.find_element(By.TAG_NAME, "h1").text
            assert driver.find_element(By.ID, "accession").text == "ACC-0042"
            assert "Not analysed: ViewPosition is LL" in page  # the lateral film, and why
            assert "Why flagged: COVID-19" in page and "above the model's operating point of 0%" in page
            assert "No reader's label yet." in page and "Shadow mode" not in page
            sr = driver.find_element(By.XPATH, "//h2[text()='Structured report']/following-sibling::table[1]").text
            assert "Not analysed: Header: not a frontal chest film" in sr  # the SR names the lateral film
            sent = driver.find_element(By.XPATH, "//h2[text()='Sent']/following-sibling::table[1]").text
            assert sent.count("pacs") == 2 and sent.count("sent") == 2  # the SC and the SR, with when
            # the refused film is shown from the spool, without an overlay
            grey = driver.find_element(By.CSS_SELECTOR, "img.film-only")
            _wait(lambda: _loaded(driver, grey), 30, "the refused film to load")
            if shots:
                driver.set_window_size(1360, 1500)
                _shot(driver, Path(shots) / "web-study.png")

            # overlay off: the original film; on again: the overlay
            toggle = driver.find_element(By.CSS_SELECTOR, "button.toggle-overlay")
            overlay_src = img.get_attribute("src")
            toggle.click()
            _wait(lambda: img.get_attribute("data-showing") == "film", 10, "the overlay to turn off")
            film_size = _wait(lambda: _loaded(driver, img), 30, "the original film to load")
            assert img.get_attribute("src") != overlay_src and toggle.text == "Show overlay"
            assert film_size[1] / film_size[0] < page_size[1] / page_size[0]  # the film alone: no legend strip
            toggle.click()
            _wait(lambda: img.get_attribute("src") == overlay_src, 10, "the overlay to come back")
            assert toggle.text == "Hide overlay"
            # the full-size view: larger than the page's picture
            full_url = driver.find_element(By.ID, "film-1-full").get_attribute("href")
            study_url = driver.current_url
            driver.get(full_url)
            full = _wait(lambda: driver.find_elements(By.TAG_NAME, "img"), 20, "the full-size picture")[0]
            full_size = _wait(lambda: _loaded(driver, full), 30, "the full-size picture to load")
            assert full_size[1] > page_size[1] and full_size[0] == 1000  # the film's own 1000 columns
            driver.get(study_url)
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "ol.story"), 20, "the study page again")

            # the view is in the study's audit story (the radiologist's view of the trail) ...
            story = driver.find_element(By.CSS_SELECTOR, "ol.story").text
            assert "viewed in the web console by rita from 127.0.0.1" in story
            assert "{" not in story and "URGENT" not in story  # sentences, no JSON, the priority said once
            # the radiologist's label for the study: stored with her name, shown, in the story
            from selenium.webdriver.support.ui import Select

            label = Select(driver.find_element(By.ID, "feedback-label"))
            assert label.first_selected_option.text == "choose a label"  # nothing stored by one stray click
            label.select_by_visible_text("COVID")
            driver.find_element(By.ID, "feedback-submit").click()
            done = _wait(lambda: driver.find_elements(By.ID, "feedback-done"), 20, "the feedback notice")[0].text
            assert done == "Stored COVID for the study."
            assert "COVID" in driver.find_element(By.ID, "feedback-in-force").text
            assert "rita" in driver.find_element(By.ID, "feedback-in-force").text
            story = driver.find_element(By.CSS_SELECTOR, "ol.story").text
            assert "labelled COVID by rita" in story and "(web)" in story
            # ... and in the audit trail an admin reads, with the patient
            driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
            _wait(lambda: driver.find_elements(By.NAME, "username"), 20, "the login page")
            driver.find_element(By.NAME, "username").send_keys("ada")
            driver.find_element(By.NAME, "password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login").click()
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "table.worklist"), 20, "the admin's worklist")
            driver.get(f"{web.url}/audit?study={urgent}&event=web.study_viewed")
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr"), 20, "the audit page")
            views = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")]
            short = driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr a.uid-short")[0]
            assert short.get_attribute("title") == urgent and len(short.text) < 24  # shortened, full on hover
            # opened, shown again after the full-size view, and after her label was stored
            assert len(views) == 3 and all("rita" in v and "PAT-0042" in v and "127.0.0.1" in v for v in views)
            assert "Hash chain intact" in driver.find_element(By.ID, "chain").text
            driver.get(f"{web.url}/audit?study={urgent}&event=feedback.added")
            _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr"), 20, "the audit page")
            labels = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")]
            assert len(labels) == 1 and "PAT-0042" in labels[0]

            # the station that sent it: active, its one labelled film counted, its plots drawn
            driver.get(f"{web.url}/stations")
            section = _wait(lambda: driver.find_elements(By.ID, "station-CR-ROOM-2"), 20, "the stations page")[0]
            assert section.find_element(By.CSS_SELECTOR, ".mode").get_attribute("textContent") == "active"
            assert "1 analysed film(s) with a reader's label" in section.text
            assert "too few films" in section.text  # one label means little, and the page says so
            roc = section.find_element(By.CSS_SELECTOR, "img[alt^='roc plot']")
            _wait(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;",
                                                roc), 30, "the station's ROC plot to load")
    finally:
        driver.quit()
        if web is not None:
            web.stop()
