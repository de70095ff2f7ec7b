"""``ambasync view`` in a real headless Chromium (Debian's, installed by scripts/install.sh's dev
path), driven by selenium through /usr/bin/chromedriver: nothing downloads a browser.

The scenarios of issue 18: open ``/?gene=Nrp1``; type a gene; see the slices change; click a
voxel and see the seed map; run a search on a planted map and see its experiment first; export
the view as PNG. Screenshots go to a temporary folder whose path is printed (``pytest -s``)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
from cubes import replica_experiments, write_test_cube
from helpers import FIXTURES, notebook_ras

pytestmark = pytest.mark.e2e

NRP1, PDYN = 74272479, 71717084
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class ServerThread:
    """The app on 127.0.0.1 and a free port, in a thread of its own; stopped by the fixture."""

    def __init__(self, app) -> None:
        self.app, self.port, self.ready = app, None, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self.stop_event = asyncio.Event()
        self.ready.set()
        self.loop.run_until_complete(self.stop_event.wait())
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ambasync.cube.read import cube_geometry, open_cube
    from ambasync.imaging.regrid import write_image
    from ambasync.view.app import View, make_app

    root = tmp_path_factory.mktemp("viewb")
    experiments = replica_experiments(10, 2, seed=2)
    store = write_test_cube(root / "mirror", experiments)
    maps = root / "maps"
    maps.mkdir()
    nrp1 = next(notebook_ras(np.asarray(e.grid, dtype=np.float32)) for e in experiments if e.experiment_id == NRP1)
    write_image(np.where(nrp1 == -1, 0, nrp1), cube_geometry(open_cube(store)), maps / "planted.nii.gz")
    view = View(str(store), labels=str(FIXTURES / "mhts" / "DSURQE_CCFv3_labels_200um.mnc"),
                label_names=str(FIXTURES / "mhts" / "DSURQE_40micron_R_mapping_long.csv"), maps=str(maps))
    assert view.coexpression.wait(60) and view.coexpression.state == "ready"
    with ServerThread(make_app(view)) as srv:
        yield f"http://127.0.0.1:{srv.port}"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: scripts/install.sh (dev path) installs Debian's "
                    "chromium and chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ambasync-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1500,1100", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Screenshots of each step, for a person to look at when a test fails (pytest keeps the last
    three sessions' temporary folders and removes older ones)."""
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


def wait_for(driver, script, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    state = driver.execute_script("return [document.getElementById('status').textContent, "
                                  "document.getElementById('find').value, location.href]")
    raise AssertionError(f"timed out waiting for: {script}\npage: {state}\nbrowser log: {driver.get_log('browser')}")


def layer_of(driver, canvas_id):
    return driver.execute_script(f"return document.getElementById('{canvas_id}').dataset.layer || ''")


def pixels(driver, canvas_id):
    return driver.execute_script(f"return document.getElementById('{canvas_id}').toDataURL()")


def test_scenarios(server, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    # 1. open /?gene=Nrp1: the gene, its experiment and three slices of it
    d.get(f"{server}/?gene=Nrp1")
    wait_for(d, "return document.body.dataset.ready === '1' && document.getElementById('a-x').dataset.layer")
    first_page = d.execute_script("const t = performance.timing; return t.loadEventEnd - t.navigationStart")
    print(f"first page (navigation to load event): {first_page} ms")
    assert d.find_element(By.ID, "gene-title").text == "Nrp1"
    assert "74272479" in d.find_element(By.ID, "experiments").text
    assert all(layer_of(d, f"a-{a}") == f"experiment:{NRP1}" for a in "zyx")
    assert "coronal" in d.find_element(By.ID, "catalogue").text
    d.save_screenshot(str(shots / "1-gene-Nrp1.png"))
    before = pixels(d, "a-z")

    # 2. type a gene: autocomplete, Enter; the slices change
    box = d.find_element(By.ID, "find")
    box.clear()
    box.send_keys("Pdy")
    wait_for(d, "return !document.getElementById('suggest').hidden && "
                "document.getElementById('suggest').textContent.includes('Pdyn')")
    d.save_screenshot(str(shots / "2-autocomplete.png"))
    box.send_keys(Keys.ENTER)
    wait_for(d, f"return document.getElementById('a-z').dataset.layer === 'experiment:{PDYN}'")
    assert pixels(d, "a-z") != before
    assert "gene=Pdyn" in d.current_url
    d.save_screenshot(str(shots / "3-typed-Pdyn.png"))

    # moving the cursor changes the other slices
    before_y = d.execute_script("return document.getElementById('a-y').dataset.index")
    canvas = d.find_element(By.ID, "a-z")
    d.execute_script("document.getElementById('seed-mode').checked = false")
    _click_voxel(d, canvas, 0.5, 0.3)
    wait_for(d, f"return document.getElementById('a-y').dataset.index !== '{before_y}'")
    wait_for(d, "return document.getElementById('voxel-info').textContent.includes('mm')")
    info = d.find_element(By.ID, "voxel-info").text
    assert "label" in info and "Pdyn" in info
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(d).move_to_element(d.find_element(By.ID, "a-y")).perform()
    wait_for(d, "return document.getElementById('hover').textContent.includes(' mm: ')")

    # 3. click a voxel: the seed map appears beside, with the genes most expressed there
    d.execute_script("document.getElementById('seed-mode').checked = true")
    _click_voxel(d, d.find_element(By.ID, "a-y"), 0.5, 0.5)
    wait_for(d, "return (document.getElementById('b-z').dataset.layer || '').startsWith('seed:')")
    assert "co-expression" in d.find_element(By.ID, "title-b").text
    wait_for(d, "return document.querySelectorAll('#seed-genes tbody tr').length > 0")
    d.save_screenshot(str(shots / "4-seed.png"))

    # 4. your map: a search on the planted map ranks its experiment first
    d.execute_script("document.getElementById('nulls').value = '0'")
    d.execute_script("document.getElementById('map-select').value = 'file:planted.nii.gz'")
    d.find_element(By.ID, "search-run").click()
    wait_for(d, "return document.body.dataset.searchDone", timeout=120)
    rows = d.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert rows and rows[0].get_attribute("data-id") == str(NRP1)
    assert d.find_element(By.ID, "csv-link").get_attribute("href").endswith("/results.csv")
    rows[0].click()
    wait_for(d, f"return document.getElementById('a-z').dataset.layer === 'experiment:{NRP1}' && "
                "document.getElementById('b-z').dataset.layer === 'map:file:planted.nii.gz'")
    wait_for(d, "return document.getElementById('voxel-info').textContent.includes('Nrp1 74272479')")
    assert "Pdyn" not in d.find_element(By.ID, "voxel-info").text  # the panel follows the layers shown
    d.save_screenshot(str(shots / "5-search.png"))

    # the mouse wheel over the axial slice steps through z
    z_before = int(d.execute_script("return document.getElementById('a-z').dataset.index"))
    d.execute_script("document.getElementById('a-z').dispatchEvent(new WheelEvent('wheel', {deltaY: -100, "
                     "bubbles: true, cancelable: true}))")
    wait_for(d, f"return document.getElementById('a-z').dataset.index === '{z_before + 1}'")

    # 5. export the current view as PNG
    url = d.execute_script("return window.ambasyncView.exportPng()")
    assert url.startswith("data:image/png;base64,")
    png = base64.b64decode(url.split(",", 1)[1])
    (shots / "6-export.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    # a deep link to an experiment
    d.get(f"{server}/?experiment={PDYN}")
    wait_for(d, f"return document.body.dataset.ready === '1' && "
                f"document.getElementById('a-x').dataset.layer === 'experiment:{PDYN}'")
    assert d.find_element(By.ID, "gene-title").text == "Pdyn"


def _click_voxel(driver, element, fx, fy):
    from selenium.webdriver.common.action_chains import ActionChains

    w, h = element.size["width"], element.size["height"]
    ActionChains(driver).move_to_element_with_offset(element, int(w * (fx - 0.5)), int(h * (fy - 0.5))).click().perform()
