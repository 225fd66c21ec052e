"""Drive the Prefect and MLflow web UIs in headless Debian Chromium, the way a user clicks through them.

Playwright drives the *system* browser (apt `chromium`): Playwright's own browser download needs
the internet and is never attempted. Routes and selectors were read off the live UIs of
Prefect 3.9.1 (`prefect server start`) and MLflow 3.17 (`mlflow server`); when either is
upgraded, run tests/e2e/test_browser_harness.py and look at its screenshots in test-artifacts/.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from nativelm.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Playwright

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # kept by CI, git-ignored
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
VIEWPORT = {"width": 1400, "height": 1000}
UI_TIMEOUT_MS = 30_000  # a cold UI on a 2-core machine takes seconds to fetch and render its bundles

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
_FLOW_RUN_URL = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")


class BrowserHarnessError(AssertionError):
    """The UI did not show or accept what the harness expected: says what, and where."""


# --------------------------------------------------------------------------------------------
# the browser


def launch_chromium(playwright: Playwright, executable: Path = CHROMIUM) -> Browser:
    """Start the system Chromium headless (sandbox off: tests run as root in containers)."""
    if not executable.is_file():
        raise BrowserHarnessError(f"{executable} not found: install Debian's chromium "
                                  f"(`bash infra/setup.sh dev` as root, or `apt-get install chromium`)")
    return playwright.chromium.launch(executable_path=str(executable), args=list(CHROMIUM_ARGS))


def artifact_path(name: str, suffix: str = ".png") -> Path:
    """A file under test-artifacts/ named after `name` (e.g. a test id), safe as a file name."""
    return ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + suffix)


# --------------------------------------------------------------------------------------------
# REST helpers (loopback servers: never through a proxy from the environment)


def _get_json(url: str) -> dict:
    reply = httpx.get(url, timeout=30, trust_env=False)
    if reply.status_code != 200:
        raise BrowserHarnessError(f"GET {url} answered {reply.status_code}: {reply.text[:200]}")
    return reply.json()


def deployment_id(api_url: str, flow_name: str, deployment_name: str) -> str:
    """The id of deployment `flow_name/deployment_name` on the Prefect server at `api_url`."""
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in (flow_name, deployment_name))
    return _get_json(f"{api_url.rstrip('/')}/deployments/name/{quoted}")["id"]


def deployment_run_ids(api_url: str, dep_id: str) -> set[str]:
    """The ids of every flow run of deployment `dep_id` the server knows."""
    reply = httpx.post(f"{api_url.rstrip('/')}/flow_runs/filter", timeout=30, trust_env=False,
                       json={"flow_runs": {"deployment_id": {"any_": [dep_id]}}, "limit": 200})
    if reply.status_code != 200:
        raise BrowserHarnessError(f"POST flow_runs/filter answered {reply.status_code}: {reply.text[:200]}")
    return {run["id"] for run in reply.json()}


# --------------------------------------------------------------------------------------------
# Prefect: trigger a deployment through "Run" -> "Custom run"


def _form_property(page: Page, name: str) -> Locator:
    """The form row of parameter `name` (its label reads `name` or `name (Optional)`)."""
    label = page.locator(".schema-form-property__label").filter(
        has_text=re.compile(rf"^\s*{re.escape(name)}(\s+\(Optional\))?\s*$"))
    prop = page.locator(".schema-form-property").filter(has=label).first
    if prop.count() == 0:
        shown = page.locator(".schema-form-property__label").all_inner_texts()
        raise BrowserHarnessError(f"the run form has no parameter {name!r} (it shows: {', '.join(shown)})")
    return prop


def _use_json_input(page: Page, prop: Locator, value: object) -> None:
    """Switch one parameter to the UI's JSON editor and type `value` as JSON (dicts, lists, None)."""
    prop.locator(".schema-form-property-menu button").click()
    page.get_by_role("button", name="Use JSON input").click()
    prop.locator("textarea.p-code-input__textarea").fill(json.dumps(value))


def _choose_option(page: Page, prop: Locator, value: str) -> None:
    # the select opens on Space, not on a synthetic click (prefect-design's p-select)
    prop.locator(".p-select-button__control").focus()
    page.keyboard.press("Space")
    page.get_by_role("option").first.wait_for(timeout=UI_TIMEOUT_MS)
    option = page.get_by_role("option", name=value, exact=True)
    if option.count() == 0:
        offered = page.get_by_role("option").all_inner_texts()
        page.keyboard.press("Escape")
        raise BrowserHarnessError(f"no option {value!r} in the select (it offers: {', '.join(offered)})")
    option.click()


def set_form_parameter(page: Page, name: str, value: object) -> None:
    """Change one parameter in the Custom run form with the widget the UI shows for its type."""
    prop = _form_property(page, name)
    switch = prop.locator("[role=switch]")
    select = prop.locator(".p-select-button__control")
    text = prop.locator(".schema-form-property__fields").locator(
        "input:not([type=checkbox]), textarea:not(.p-code-input__textarea)")
    if isinstance(value, bool) and switch.count() == 1:
        if (switch.get_attribute("aria-checked") == "true") != value:
            switch.click()
    elif isinstance(value, str) and select.count() == 1:
        _choose_option(page, prop, value)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool) and text.count() == 1:
        text.fill(str(value))
    else:
        _use_json_input(page, prop, value)


def trigger_deployment_run(page: Page, prefect_ui_url: str, flow_name: str, deployment_name: str,
                           parameters: Mapping[str, object]) -> str:
    """Open the deployment in the Prefect UI, Run -> Custom run, change `parameters`, submit; return
    the new flow run's id, read from the URL of the run page the toast's "View run" opens.

    A busy server can fail the UI's own calls ("Oops. Something went wrong."): when the run was made
    but no toast came, its id comes from the API; when no run was made, Submit is pressed once more.
    """
    base = prefect_ui_url.rstrip("/")
    dep_id = deployment_id(base + "/api", flow_name, deployment_name)
    page.goto(f"{base}/deployments/deployment/{dep_id}")
    page.get_by_role("button", name="Run", exact=True).click(timeout=UI_TIMEOUT_MS)
    page.get_by_role("button", name="Custom run").click()
    page.get_by_role("button", name="Submit").wait_for(timeout=UI_TIMEOUT_MS)
    page.locator(".schema-form-property").first.wait_for(timeout=UI_TIMEOUT_MS)
    for name, value in parameters.items():
        set_form_parameter(page, name, value)
    errors = page.locator(".p-message--error, .p-base-input--failed")
    # the UI mounts two toast containers, each showing the same toast: the last one lies on top
    view_run = page.locator(".p-toast-container__toast").get_by_role("button", name="View run").last
    before = deployment_run_ids(base + "/api", dep_id)
    for attempt in (1, 2):
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            if errors.count():
                raise BrowserHarnessError(f"Prefect UI refused the run form on {page.url}: "
                                          f"{' | '.join(errors.all_inner_texts())[:300]}")
            if view_run.is_visible():
                break
            created = deployment_run_ids(base + "/api", dep_id) - before
            if len(created) == 1:  # the run exists; the UI's toast did not come (a busy server)
                page.wait_for_timeout(2000)
                if not view_run.is_visible():
                    run_id = created.pop()
                    page.goto(f"{base}/runs/flow-run/{run_id}")
                    return run_id
            elif created:
                raise BrowserHarnessError(f"one Submit on {page.url} made {len(created)} flow runs")
            page.wait_for_timeout(500)
        if view_run.is_visible():
            break
        if attempt == 2:
            raise BrowserHarnessError(f"Prefect UI showed no 'View run' toast after Submit on {page.url} "
                                      "and no flow run was created")
    view_run.click()
    page.wait_for_url(_FLOW_RUN_URL, timeout=UI_TIMEOUT_MS)
    found = _FLOW_RUN_URL.search(page.url)
    assert found is not None  # wait_for_url matched it
    return found.group(1)


# --------------------------------------------------------------------------------------------
# Prefect: wait for a flow run (REST)


@dataclass(frozen=True)
class FlowRunState:
    """Where a flow run ended: its state and the parameters the server recorded for it."""

    run_id: str
    state_type: str  # COMPLETED, FAILED, CRASHED, CANCELLED (or the last one seen on timeout)
    state_name: str
    parameters: dict

    @property
    def completed(self) -> bool:
        return self.state_type == "COMPLETED"


def flow_run_state(api_url: str, run_id: str) -> FlowRunState:
    """The flow run's current state, from GET /flow_runs/{id}."""
    run = _get_json(f"{api_url.rstrip('/')}/flow_runs/{run_id}")
    return FlowRunState(run_id, run.get("state_type") or "", run.get("state_name") or "", run.get("parameters", {}))


def wait_flow_run(api_url: str, run_id: str, timeout: float, poll_s: float = 0.5) -> FlowRunState:
    """Poll until the flow run reaches a final state; BrowserHarnessError with its last state on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        state = flow_run_state(api_url, run_id)
        if state.state_type in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise BrowserHarnessError(f"flow run {run_id} still {state.state_type or 'without state'} "
                                      f"({state.state_name}) after {timeout:.0f} s")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# MLflow: the compare-runs view


def _mlflow_run(mlflow_url: str, run_id: str) -> dict:
    return _get_json(f"{mlflow_url.rstrip('/')}/api/2.0/mlflow/runs/get?run_id={urllib.parse.quote(run_id)}")["run"]


def _keys(runs: Sequence[dict], kind: str) -> set[str]:
    """Names of the params or metrics any of the runs (MLflow REST `run` objects) has."""
    return {item["key"] for run in runs for item in run.get("data", {}).get(kind, [])}


def compare_runs_url(mlflow_url: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """MLflow's compare page: `#/compare-runs?runs=[...]&experiments=[...]` (JSON lists)."""
    query = urllib.parse.urlencode({"runs": json.dumps(list(run_ids)), "experiments": json.dumps(list(experiment_ids))})
    return f"{mlflow_url.rstrip('/')}/#/compare-runs?{query}"


def screenshot_mlflow_compare(page: Page, mlflow_url: str, run_ids: Sequence[str], path: Path,
                              expect: Sequence[str] | None = None) -> Path:
    """Open MLflow's compare view of `run_ids`, wait until every run's name and the texts in `expect`
    have rendered (by default the first parameter and the first metric in MLflow's order: its long
    tables are virtualised, so later rows may never be in the page), and save a screenshot to
    `path` (written whole, through a temporary file)."""
    runs = [_mlflow_run(mlflow_url, run_id) for run_id in run_ids]
    experiments = sorted({run["info"]["experiment_id"] for run in runs})
    page.goto(compare_runs_url(mlflow_url, run_ids, experiments))
    page.get_by_text(f"Comparing {len(run_ids)} Runs").wait_for(timeout=UI_TIMEOUT_MS)
    close_assistant = page.get_by_role("button", name="Close").first  # the "MLflow Assistant" side panel
    if close_assistant.is_visible():
        close_assistant.click()
    expected = [run["info"]["run_name"] for run in runs]
    if expect is None:
        expect = [min(keys) for keys in (_keys(runs, "params"), _keys(runs, "metrics")) if keys]
    expected += list(expect)
    for text in dict.fromkeys(expected):  # in order, once each
        page.get_by_text(text, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
    fit_viewport_to_content(page)
    atomic_write_bytes(Path(path), page.screenshot(full_page=True))
    return Path(path)


def screenshot_mlflow_experiment(page: Page, url: str, run_names: Sequence[str], path: Path) -> Path:
    """Open the experiment page at `url` (the link `nativelm run` prints) and wait until the runs table
    shows every name in `run_names`: MLflow 3's GenAI overview lists no runs. Saves a screenshot to
    `path` (written whole, through a temporary file)."""
    page.goto(url)
    for name in run_names:
        page.get_by_text(name, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
    close_assistant = page.get_by_role("button", name="Close").first  # the "MLflow Assistant" side panel
    if close_assistant.is_visible():
        close_assistant.click()
    fit_viewport_to_content(page)
    atomic_write_bytes(Path(path), page.screenshot(full_page=True))
    return Path(path)


def runs_table_columns(page: Page) -> list[str]:
    """The column headers of the runs table now on screen, in order, once each (MLflow draws some twice)."""
    seen: list[str] = []
    for header in page.locator("[role=columnheader]").all():
        text = header.inner_text().strip()
        if text and text not in seen:
            seen.append(text)
    return seen


# how much taller the page's main scrolling panel is than its box (the largest box that scrolls:
# tables inside it may scroll on their own, virtualised, and must not count)
_HIDDEN_HEIGHT_JS = """() => {
  let main = null;
  for (const e of document.querySelectorAll('*')) {
    const overflow = getComputedStyle(e).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && e.scrollHeight > e.clientHeight
        && (main === null || e.clientHeight > main.clientHeight)) main = e;
  }
  return Math.max(main ? main.scrollHeight - main.clientHeight : 0,
                  document.documentElement.scrollHeight - window.innerHeight);
}"""


def fit_viewport_to_content(page: Page, max_height: int = 4000) -> None:
    """Make the viewport tall enough to show all of the page's main scrolling panel, so a screenshot
    shows all of it (MLflow scrolls inside a panel: a `full_page` screenshot alone would cut it off)."""
    size = page.viewport_size or VIEWPORT
    hidden = int(page.evaluate(_HIDDEN_HEIGHT_JS))
    if hidden > 0:
        page.set_viewport_size({"width": size["width"], "height": min(max_height, size["height"] + hidden + 40)})
