"""The HTML report renders in a real headless browser (Chromium from the distribution's packages, driven by
Playwright): no console errors, a trade-off curve that is not blank, per-layer charts naming every layer,
and tables whose numbers are the JSON report's."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.html_report import compress_html, sweep_html
from onnx_dacomp.sweep import sweep

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "dacomp_cifar_cnn.onnx"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ROWS = """selector => [...document.querySelectorAll(selector + ' tbody tr')].map(
    tr => [...tr.cells].map(td => [td.dataset.key || null, td.dataset.value || null, td.textContent]))"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "images.npz"
    smooth = rng.random((200, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    np.savez(path, input=(smooth - 0.5).astype(np.float32), labels=rng.integers(0, 10, 200))
    return path


def _open(browser, html: str, tmp_path):
    page_file = tmp_path / "report.html"
    page_file.write_text(html)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_file.as_uri())
    return page, errors


def _not_blank(png: bytes) -> None:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    inked = (pixels.sum(axis=2) < 600).mean()  # anything darker than near-white
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 60).mean()  # the measured points (matplotlib's C0)
    assert inked > 0.01 and blue > 0.0002, (inked, blue)


def _number(value):
    return None if value is None else float(value)


def test_compress_report_renders_with_the_json_numbers(browser, data, tmp_path):
    config = CompressConfig(ratio=0.5, method="auto", holdout=64, max_iter=5, layer_timings=True)
    report = onnx_dacomp.compress(str(BUNDLED), ArraySource(data, ["input"]), config, progress=False).report
    as_json = json.loads(report.to_json())
    page, errors = _open(browser, compress_html(report, "bundled model"), tmp_path)
    _not_blank(page.locator("#tradeoff-curve").screenshot())
    assert errors == []
    # every layer is named in the per-layer charts and has its row, with the JSON's numbers
    charts = page.locator("#layer-charts svg").text_content()
    rows = page.evaluate(ROWS, "#layer-table")
    assert len(rows) == len(as_json["layers"]) == 8
    for row, layer in zip(rows, as_json["layers"]):
        assert layer["name"] in charts
        cells = {key: (value, text) for key, value, text in row if key}
        assert cells["name"][1] == layer["name"]
        for key in ("params_before", "params_after", "macs_before", "macs_after", "rel_error", "sensitivity"):
            assert _number(cells[key][0]) == layer[key], key
        assert cells["latency_before"][0] is not None and _number(cells["latency_before"][0]) == layer["latency_before"]
        assert cells["ranks"][1] == "x".join(map(str, layer["ranks"] or []))
        assert cells["params_after"][1] == f"{layer['params_after']:,}"  # shown as the JSON has it
    page.close()
    summary = _key_values(browser, compress_html(report, "bundled model"), tmp_path)
    assert summary["model params after"] == as_json["model"]["params_after"]
    assert summary["relative output error"] == as_json["verification"]["outputs"][0]["rel_error"]
    assert summary["top-1 compressed"] == as_json["verification"]["outputs"][0]["top1_compressed"]


def _key_values(browser, html: str, tmp_path) -> dict:
    page, _ = _open(browser, html, tmp_path)
    pairs = page.evaluate(
        "() => [...document.querySelectorAll('#summary-table tr')].map(tr => [tr.cells[0].textContent, "
        "tr.cells[1].dataset.value || null])"
    )
    page.close()
    return {key: _number(value) for key, value in pairs if value is not None}


def test_sweep_report_renders_every_point_with_the_json_numbers(browser, data, tmp_path):
    config = CompressConfig(method="auto", holdout=64, max_iter=5)
    result = sweep(str(BUNDLED), ArraySource(data, ["input"]), (0.3, 0.6), config, progress=False)
    as_json = json.loads(result.to_json())
    page, errors = _open(browser, sweep_html(result, "bundled model sweep"), tmp_path)
    _not_blank(page.locator("#tradeoff-curve").screenshot())
    assert errors == []
    rows = page.evaluate(ROWS, "#points")
    assert len(rows) == len(as_json["points"]) == 2
    for row, point in zip(rows, as_json["points"]):
        cells = {key: value for key, value, _ in row if key}
        for key in ("ratio", "params", "macs", "model_params", "model_bytes", "rel_output_error", "top1", "latency_b1"):
            assert _number(cells[key]) == point[key], key
    for index, point in enumerate(as_json["points"]):
        layer_rows = page.evaluate(ROWS, f"#layer-{index}-table")
        assert [_number(dict((k, v) for k, v, _ in row if k)["params_after"]) for row in layer_rows] == [
            layer["params_after"] for layer in point["report"]["layers"]
        ]
    page.close()


def test_a_report_without_data_renders_its_layers_and_says_what_was_not_measured():
    """The data-free fit: no verification, no latency, no sensitivities, so no estimated curve either."""
    config = CompressConfig(ratio=0.5, norm="frobenius", benchmark=False)
    report = onnx_dacomp.compress(str(BUNDLED), None, config, progress=False).report
    assert report.verification is None and report.estimated_curve == ()
    page = compress_html(report, "data-free")
    assert "latency not measured" in page and page.count("<tr") > len(report.layers)
    assert 'id="layer-table"' in page and "<script" not in page and "http" not in page.split("<svg", 1)[0]
