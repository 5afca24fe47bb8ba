"""What a reviewer does in the MLflow dashboard (`dlpipe ui`), as Selenium steps that return
what the page shows. The tests assert on those; `walk_dashboard` also saves a screenshot of
each page (docs/dashboard_*.png are made by it, over a full pipeline run's store:
DEVELOPERS.md says how).

The steps find things by the text a person reads (experiment and run names, tab titles),
not by MLflow's generated CSS classes, so a restyled UI does not break them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 60  # the first page load compiles nothing, but a busy 2-CPU machine is slow


@dataclass
class Seen:
    """What the pages showed."""

    supervised_runs: list[str] = field(default_factory=list)
    run_page: str = ""
    val_accuracy_points: int = 0
    artifact_image_width: int = 0
    tune_rows_before_expanding: list[str] = field(default_factory=list)
    tune_rows_expanded: list[str] = field(default_factory=list)
    trials_by_val_accuracy: list[str] = field(default_factory=list)
    classifier_row: str = ""


def _wait(driver: WebDriver):
    return WebDriverWait(driver, WAIT_S)


def _by_text(text: str):
    return (By.XPATH, f"//*[normalize-space(text())={_xpath_literal(text)}]")


def _xpath_literal(text: str) -> str:
    return f"'{text}'" if "'" not in text else f'"{text}"'


def _click(driver: WebDriver, locator) -> None:
    _wait(driver).until(ready.element_to_be_clickable(locator)).click()


def _run_names(driver: WebDriver) -> list[str]:
    """The run names of the runs table, top to bottom."""
    links = driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")
    return [link.text for link in links if link.text]


def _shot(driver: WebDriver, folder: Path | None, name: str) -> None:
    if folder is not None:
        driver.save_screenshot(str(folder / f"dashboard_{name}.png"))


def walk_dashboard(
    driver: WebDriver, url: str, run_id: str, screenshots: Path | None = None
) -> Seen:
    """Open the dashboard at `url`, then: experiment dlpipe-supervised and its training run
    `run_id` (metric charts, the learning-curve image among its artifacts); dlpipe-tune, its
    parent run expanded, the trials sorted by val_accuracy; the model registry."""
    seen = Seen()
    driver.get(f"{url}/#/experiments")
    # MLflow 3 opens on its GenAI views; a reviewer of training runs switches once (the
    # choice is kept in the browser).
    _click(driver, _by_text("Model training"))
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant panel: more room for the pages
    _click(driver, (By.LINK_TEXT, "dlpipe-supervised"))
    _wait(driver).until(ready.presence_of_element_located((By.LINK_TEXT, "train_supervised")))
    seen.supervised_runs = _run_names(driver)
    _shot(driver, screenshots, "runs")

    driver.get(f"{url}/#/experiments/{_experiment_id(driver)}/runs/{run_id}")
    _wait(driver).until(
        ready.presence_of_element_located(
            (By.XPATH, "//*[starts-with(normalize-space(text()), 'Parameters (')]")
        )
    )
    seen.run_page = driver.find_element(By.TAG_NAME, "body").text
    _click(driver, _by_text("Model metrics"))
    _wait(driver).until(
        ready.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot, svg.main-svg"))
    )
    seen.val_accuracy_points = _search_charts(driver, "val_accuracy")
    _shot(driver, screenshots, "metrics")
    _click(driver, _by_text("Artifacts"))
    _click(driver, _by_text("plots"))
    _click(driver, _by_text("learning_curves.png"))
    image = _wait(driver).until(
        lambda d: next(
            (
                i
                for i in d.find_elements(By.CSS_SELECTOR, "img")
                if int(i.get_attribute("naturalWidth") or 0) > 300
            ),
            None,
        )
    )
    seen.artifact_image_width = int(image.get_attribute("naturalWidth"))
    _shot(driver, screenshots, "artifact")

    driver.get(f"{url}/#/experiments")
    _click(driver, (By.LINK_TEXT, "dlpipe-tune"))
    parent = _wait(driver).until(ready.presence_of_element_located((By.LINK_TEXT, "tune")))
    seen.tune_rows_before_expanding = _run_names(driver)
    parent.find_element(
        By.XPATH, "./ancestor::span[contains(@class,'ag-cell-value')]//button"
    ).click()
    _wait(driver).until(lambda d: len(_run_names(d)) > 1)
    seen.tune_rows_expanded = _run_names(driver)
    _shot(driver, screenshots, "tune")
    order = quote("metrics.`val_accuracy`")
    driver.get(
        f"{url}/#/experiments/{_experiment_id(driver)}/runs?orderByKey={order}&orderByAsc=false"
    )
    driver.refresh()  # a new address in the same page keeps the table's old order a while
    _wait(driver).until(lambda d: any(n.startswith("trial-") for n in _run_names(d)))
    seen.trials_by_val_accuracy = [n for n in _run_names(driver) if n.startswith("trial-")]

    driver.get(f"{url}/#/models")
    link = _wait(driver).until(
        ready.presence_of_element_located((By.LINK_TEXT, "dlpipe-classifier"))
    )
    _dismiss_announcement(driver)
    seen.classifier_row = link.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").text
    _shot(driver, screenshots, "models")
    return seen


def _dismiss_announcement(driver: WebDriver) -> None:
    """Close the dialog MLflow opens over the registry on a first visit (news of its UI)."""
    try:
        dialog = WebDriverWait(driver, 5).until(
            ready.visibility_of_element_located((By.CSS_SELECTOR, "[role='dialog']"))
        )
    except TimeoutException:
        return
    dialog.find_element(By.CSS_SELECTOR, "button[aria-label='Close']").click()
    WebDriverWait(driver, 10).until(ready.invisibility_of_element(dialog))


def _experiment_id(driver: WebDriver) -> str:
    """The experiment the browser is in, from its address (#/experiments/<id>/...)."""
    return driver.current_url.split("#/experiments/", 1)[1].split("/", 1)[0].split("?", 1)[0]


def _search_charts(driver: WebDriver, metric: str) -> int:
    """How many points the chart of `metric` draws on a run's Model metrics tab (one per
    logged step), found through the tab's chart search box."""
    box = _wait(driver).until(
        ready.element_to_be_clickable((By.CSS_SELECTOR, "input[placeholder*='earch']"))
    )
    box.send_keys(metric)

    def points(d: WebDriver) -> int | None:
        for title in d.find_elements(*_by_text(metric)):
            cards = title.find_elements(
                By.XPATH, "./ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]"
            )
            if cards:
                drawn = cards[0].find_elements(By.CSS_SELECTOR, ".scatterlayer path.point")
                if drawn:
                    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", cards[0])
                    return len(drawn)
        return None

    return _wait(driver).until(points)


if __name__ == "__main__":  # refresh the README's screenshots: URL RUN_ID FOLDER
    import sys

    from tests.helpers import headless_chromium

    dashboard, training_run, folder = sys.argv[1:4]
    with headless_chromium(1400, 900) as browser:
        walk_dashboard(browser, dashboard, training_run, Path(folder))
