"""The rendered reports in a real browser: headless Chromium opens an index and a notebook's report made by
`reports.report_all`, plotly draws every figure (its SVG is in the rendered DOM) from the one copy of plotly.js
beside the pages, the pages log nothing to the console (no uncaught errors) and name no folder of this machine,
and a screenshot of each is kept in the test's folder. The what-if dashboard's report, opened with every host
name unresolvable (offline), shows the dashboard's state: its figure drawn, its summary, no widget scripts.

Needs Debian's `chromium` (`apt-get install -y chromium`); skipped, saying so, only when no binary is found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prescope.workbench import reports

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "05_h200_report"  # figures from committed files: the cheapest real notebook to run
DASHBOARD = "04_whatif"
DASHBOARD_PARAMETERS = dict(tiny_trace_path="", num_prompts=1, max_new_tokens=6, data_dir="", batch_size=1,
                            max_steps=4, link_sweep=[8.0, 64.0], sweep_policies=["on_demand_lru"],
                            sweep_batch_sizes=[1])
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"  # no host name resolves: a reader without network
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install -y chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0")
SCRIPT_BUDGET_MS = 15000  # virtual time the page's scripts get before the DOM is read (plotly draws in ~1 s)
WINDOW = "1400,2400"
TIMEOUT_S = 120
CONSOLE = re.compile(r":CONSOLE[:(]")  # Chromium's log line for anything a page wrote to its console


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip(f"no headless Chromium ({', '.join(BROWSERS)}) on PATH; install it with `{INSTALL}`")
    return found


def open_page(browser: str, page: Path, work: Path, *extra: str) -> tuple[str, list[str]]:
    """Load `page` in a fresh profile; returns (stdout, the console lines Chromium logged)."""
    profile = work / f"profile-{page.stem}-{len(list(work.glob('profile-*')))}"
    profile.mkdir(parents=True)
    done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={SCRIPT_BUDGET_MS}",
                           f"--window-size={WINDOW}", *extra, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [line for line in done.stderr.splitlines() if CONSOLE.search(line)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    results = reports.report_all(ROOT / "notebooks", out, names=[NOTEBOOK], progress=False)
    assert all(r.ok for r in results), [r.error for r in results]
    return out


def test_the_console_check_catches_a_script_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    _, console = open_page(browser, page, tmp_path, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console), console


def test_notebook_report_draws_its_figures_without_script_errors(browser, rendered):
    page = rendered / f"{NOTEBOOK}.html"
    figures = page.read_text().count('class="plotly-graph-div"')
    assert figures >= 3 and f'src="{reports.plotly_js_name()}"' in page.read_text()  # the shared copy beside it
    dom, console = open_page(browser, page, rendered, "--dump-dom")
    assert console == [], "the page logged to its console:\n" + "\n".join(console)
    assert dom.count('class="plot-container plotly"') == figures  # plotly built every figure...
    assert dom.count('class="main-svg"') >= 2 * figures  # ...and drew it (plot and hover layers)
    assert len(re.findall(r'class="(?:bars|point|scatterlayer)', dom)) >= figures  # with traces in it
    assert "measured on host:NVIDIA H200" in dom
    shot = rendered / f"{NOTEBOOK}.png"
    open_page(browser, page, rendered, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_no_page_names_a_folder_of_this_machine(rendered):
    for page in rendered.glob("*.html"):
        text = page.read_text()
        assert str(ROOT) not in text and str(Path.home()) + "/" not in text, page.name


def test_the_dashboard_report_shows_its_state_offline(browser, tmp_path):
    result = reports.run_notebook(ROOT / "notebooks" / f"{DASHBOARD}.ipynb", tmp_path, DASHBOARD_PARAMETERS)
    assert result.ok, result.error
    page = tmp_path / f"{DASHBOARD}.html"
    html = page.read_text()
    assert "The dashboard as drawn" in html and "@jupyter-widgets" not in html  # its state, no widget scripts
    figures = html.count('class="plotly-graph-div"')
    assert figures == 2  # the dashboard's timeline and the one sweep's figure
    assert str(ROOT) not in html and str(tmp_path) not in html
    dom, console = open_page(browser, page, tmp_path, OFFLINE, "--dump-dom")
    assert console == [], "the page logged to its console:\n" + "\n".join(console)
    assert dom.count('class="plot-container plotly"') == figures  # every figure drawn, offline
    assert "prefetches" in dom and "simulated on h200" in dom
    shot = tmp_path / f"{DASHBOARD}.png"
    open_page(browser, page, tmp_path, OFFLINE, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_links_the_report_and_renders_cleanly(browser, rendered):
    index = rendered / "index.html"
    dom, console = open_page(browser, index, rendered, "--dump-dom")
    assert console == [], "the index logged to its console:\n" + "\n".join(console)
    assert f'href="{NOTEBOOK}.html"' in dom and "measured on host:NVIDIA H200" in dom
    shot = rendered / "index.png"
    open_page(browser, index, rendered, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
