"""The HTML report opened from disk by a real browser: every image loads, and a screenshot is saved.

Skipped unless Debian's `chromium` is installed at /usr/bin/chromium (CI does not install it)."""

import re
import subprocess
from pathlib import Path

import pytest
from analysis_runs import PNG_MAGIC

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")

# Set after the load event: how many <img> the page has and how many decoded to a real bitmap.
IMAGE_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_images_load_in_chromium(analyzed, tmp_path):
    run, _ = analyzed
    report = run / "report" / "report.html"
    html = report.read_text()
    # a copy with the probe, next to the original so it resolves the same way from disk
    probe = run / "report" / "probe.html"
    probe.write_text(html.replace("</body>", IMAGE_PROBE + "</body>"))
    try:
        res = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    body = re.search(r"<body[^>]*>", res.stdout)
    assert body, f"chromium printed no DOM (exit {res.returncode}): {res.stderr[-500:]}"
    images = re.search(r'data-images="(\d+)"', body.group(0))
    loaded = re.search(r'data-loaded="(\d+)"', body.group(0))
    assert images and loaded, f"the load probe did not run: {body.group(0)}"
    assert int(images.group(1)) == html.count("<img") == 9
    assert int(loaded.group(1)) == int(images.group(1))

    shot = run / "report" / "screenshot.png"
    res = chromium(tmp_path, "--window-size=1280,7000", "--hide-scrollbars", f"--screenshot={shot}",
                   report.resolve().as_uri())
    assert shot.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-500:]}"
    assert shot.read_bytes().startswith(PNG_MAGIC)
    from PIL import Image  # matplotlib's dependency

    with Image.open(shot) as im:
        gray = im.convert("L")
        assert gray.size == (1280, 7000)
        dark = sum(n for value, n in enumerate(gray.histogram()) if value < 200)
    assert dark > 0.03 * 1280 * 7000  # figures and text, not a blank page
