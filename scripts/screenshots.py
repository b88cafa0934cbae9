"""Screenshots of each `harness view` page, for docs/view.md.

    .venv/bin/python scripts/screenshots.py [--out docs/images]

Plays the same small runs the viewer's tests play (tests/view_server.py: an oracle τ-airline run
with the scripted user, a fake-LLM run whose tool result holds HTML, a fake-LLM sibling group, and
a two-step toy SGCD training run with credit recording) into a temporary database, starts `harness
view` on it and saves, with Debian's headless Chromium (/usr/bin/chromium, driven by Playwright's
Python package), view-runs.png, view-run.png, view-episode.png, view-compare.png, view-group.png
(the training step's group, with its SGCD reference), view-training.png and view-credit.png.
Needs the τ data (`harness data pull tau-airline`, or HARNESS_DATA_DIR).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from view_server import HOSTILE_RUN, ORACLE, TRAIN, ViewServer, db_url, fill, fill_training  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        db = db_url(Path(tmp) / "h.db")
        fill(db)
        fill_training(db, Path(tmp) / "train")
        server = ViewServer(db)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(server.url + "/runs")
                page.get_by_label(f"compare {ORACLE}").check()
                page.get_by_label(f"compare {HOSTILE_RUN}").check()
                shoot(page, out / "view-runs.png")
                page.locator("#compare").click()
                shoot(page, out / "view-compare.png")
                page.goto(server.url + "/runs")
                page.get_by_role("link", name=HOSTILE_RUN, exact=True).click()
                shoot(page, out / "view-run.png")
                page.locator("#tasks a.trial").last.click()
                shoot(page, out / "view-episode.png")
                page.goto(server.url + "/runs?kind=train")
                page.get_by_role("link", name=TRAIN, exact=True).click()
                page.locator("#training-link").click()
                shoot(page, out / "view-training.png")
                page.locator("#credit-steps a").first.click()
                shoot(page, out / "view-credit.png")
                page.get_by_role("link", name="the siblings' conversations").click()
                shoot(page, out / "view-group.png")
                browser.close()
        finally:
            server.stop()


def shoot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
