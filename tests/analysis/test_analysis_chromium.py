"""The HTML report opened from disk by a real browser: every image loads, and a screenshot is saved.

Skipped unless Chromium is installed (Debian's `chromium` package: /usr/bin/chromium, or `chromium` on
PATH). CI installs it best-effort (.ci/run). The screenshot is RUN/report/screenshot.png in the
session's temporary directory; its path is printed (pytest -s shows it)."""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from analysis_runs import PNG_MAGIC

CHROMIUM = Path("/usr/bin/chromium") if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

# Set after the load event: how many <img> the page has and how many decoded to a real bitmap.
IMAGE_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # a fresh profile per call: nothing left over (locks, caches) from an earlier run can interfere;
    # the network is closed, so everything that would phone home is switched off
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def image_counts(tmp: Path, html: str, next_to: Path) -> tuple[int, int]:
    """(images, images decoded) of `html` opened from disk by Chromium, via the load probe. The page is
    written next to `next_to` so it resolves relative URLs (there should be none) like the original."""
    probe = next_to.with_name("probe.html")
    probe.write_text(html.replace("</body>", IMAGE_PROBE + "</body>"))
    try:
        res = chromium(tmp, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    body = re.search(r"<body[^>]*>", res.stdout)
    assert body, f"chromium printed no DOM (exit {res.returncode}): {res.stderr[-500:]}"
    images = re.search(r'data-images="(\d+)"', body.group(0))
    loaded = re.search(r'data-loaded="(\d+)"', body.group(0))
    assert images and loaded, f"the load probe did not run: {body.group(0)}"
    return int(images.group(1)), int(loaded.group(1))


def test_report_images_load_in_chromium(analyzed, tmp_path):
    run, _ = analyzed
    report = run / "report" / "report.html"
    html = report.read_text()
    assert image_counts(tmp_path, html, report) == (9, 9)
    assert html.count("<img") == 9
    # control: the probe does notice a broken image (one PNG's signature overwritten)
    broken = html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAAA', 1)
    assert broken != html and image_counts(tmp_path, broken, report) == (9, 8)

    shot = run / "report" / "screenshot.png"
    res = chromium(
        tmp_path, "--window-size=1280,7000", "--hide-scrollbars", f"--screenshot={shot}", report.resolve().as_uri()
    )
    assert shot.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-500:]}"
    assert shot.read_bytes().startswith(PNG_MAGIC)
    from PIL import Image  # matplotlib's dependency

    with Image.open(shot) as im:
        gray = im.convert("L")
        assert gray.size == (1280, 7000)
        dark = sum(n for value, n in enumerate(gray.histogram()) if value < 200)
    assert dark > 0.03 * 1280 * 7000  # figures and text, not a blank page
    print(f"screenshot: {shot}")
