"""Screenshot an analysis report (``sonicrec analyse``) in headless Chromium.

    python scripts/screenshot_report.py RUN/analysis --out docs/analysis-report.png

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); checks that the page's images
loaded and that it holds playable ``<audio>`` players before taking the screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium(binary: str | None) -> str:
    found = shutil.which(binary) if binary else next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        sys.exit("no Chromium found: install it (apt-get install -y chromium) or pass --chromium PATH")
    return found


def headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", "--allow-file-access-from-files", "--virtual-time-budget=5000",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def check_page(browser: str, url: str) -> None:
    """Fail unless every image rendered and at least one <audio> has a source in the loaded DOM."""
    probe = (
        "<script>addEventListener('load', () => { const imgs = [...document.images];"
        "document.title = JSON.stringify({images: imgs.length,"
        "broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),"
        "audio: document.querySelectorAll('audio[src]').length}); });</script>"
    )
    page = Path(url.removeprefix("file://"))
    probe_page = page.with_name(".probe-" + page.name)
    text = page.read_text(encoding="utf-8").replace("</head>", probe + "</head>")
    probe_page.write_text(text, encoding="utf-8")
    try:
        dom = headless(browser, "--dump-dom", probe_page.as_uri()).stdout
    finally:
        probe_page.unlink()
    start, end = dom.find("<title>"), dom.find("</title>")
    summary = dom[start + len("<title>") : end] if start >= 0 else "(no title)"
    print(f"loaded page: {summary}")
    if '"broken":[]' not in summary or '"audio":0' in summary:
        sys.exit(f"the report did not render completely: {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report folder or its index.html")
    parser.add_argument("--out", type=Path, default=Path("docs/analysis-report.png"))
    parser.add_argument("--window-size", default="1280,2000", help="width,height in pixels")
    parser.add_argument("--chromium", help=f"browser binary (default: the first of {', '.join(BROWSERS)})")
    args = parser.parse_args()
    page = args.report / "index.html" if args.report.is_dir() else args.report
    if not page.is_file():
        sys.exit(f"no report at {page}: run `sonicrec analyse RUN_DIR` first")
    browser = chromium(args.chromium)
    url = page.resolve().as_uri()
    check_page(browser, url)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = headless(browser, f"--screenshot={args.out.resolve()}", f"--window-size={args.window_size}", url)
    if not args.out.is_file():
        sys.exit(f"Chromium wrote no screenshot:\n{result.stderr[-2000:]}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
