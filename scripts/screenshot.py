"""Screenshot of `clt serve` on a graph, as in the README: a feature's panel and an intervention.

    .venv/bin/python scripts/screenshot.py runs/demo/graphs/opposite.json docs/images/serve.png

Serves the graph with `launch_interface`, opens it in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright; `bash scripts/ci/chromium.sh` installs it), clicks
the most influential labelled feature node (or `--node ID`), queues "scale by 0" on it, waits
for the logit chart and saves a 1400x900 screenshot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clt_forge.serve import launch_interface

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--node", help="node_id to click (default: the most influential labelled feature)")
    args = parser.parse_args()
    document = json.loads(args.graph.read_text())
    node = args.node or most_influential_feature(document)

    from playwright.sync_api import sync_playwright

    with (
        launch_interface(args.graph, port=0, block=False, threads=2) as ui,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(ui.url)
        page.wait_for_function("window.cltServe && window.cltServe.ready", timeout=120_000)
        at = page.evaluate("(id) => window.cltServe.nodePosition(id)", node)
        if at is None:
            raise SystemExit(f"--node {node}: not drawn in the graph at its saved thresholds")
        page.mouse.click(at["x"], at["y"])
        page.wait_for_selector(f"#panel [data-node='{node}']", timeout=30_000)
        page.wait_for_function("document.querySelector('#target').innerText.includes('feature L')", timeout=30_000)
        page.click("label:has-text('scale by')")
        page.fill("#amount", "0")
        page.click("#queue")
        page.wait_for_selector("[data-job='1']", timeout=600_000)
        page.mouse.move(at["x"], at["y"])  # the node's label as a tooltip
        page.wait_for_timeout(500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"{args.out}: {node} of {args.graph}")


def most_influential_feature(document: dict) -> str:
    features = [
        n
        for n in document["nodes"]
        if n["feature_type"] == "cross layer transcoder" and n.get("clerp") and n.get("influence") is not None
    ]
    if not features:
        raise SystemExit("the graph has no labelled feature node: pass --node ID")
    return min(features, key=lambda n: n["influence"])["node_id"]  # influence: cumulative, smallest first


if __name__ == "__main__":
    main()
