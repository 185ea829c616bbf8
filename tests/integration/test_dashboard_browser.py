"""The dashboard in a real browser (Debian's chromium driven by Playwright) over a real worker,
``leadstream api``, Kafka and Redis: it loads with data, the charts render, filters work, the lead
page shows its score history, and the console stays clean. The screenshot it saves,
docs/img/dashboard.png, is the one in the README."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from models.offline.simulate import OWNERS, simulate
from streams.publish import topic_for
from tests.integration.api_process import start_api, stop
from tests.integration.conftest import settings_env
from tests.integration.test_api import TOKEN

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"


async def test_dashboard_in_a_real_browser(pipeline_settings, start_worker, producer, consume, redis_client,
                                          tmp_path) -> None:
    from playwright.async_api import async_playwright

    s = pipeline_settings
    start_worker(LEADSTREAM_API_TOKEN=TOKEN, LEADSTREAM_MODEL_MIN_OUTCOMES="5")
    env = settings_env(s) | {"LEADSTREAM_API_TOKEN": TOKEN}
    api = start_api(env, s.api_port, tmp_path / "api.log")
    try:
        events = simulate(60, seed=11)
        for e in events:
            await producer.send(topic_for(s, e["type"]), key=e["lead_id"].encode(), value=orjson.dumps(e))
        await producer.flush()
        await consume(s.topic_scores, len(events), timeout=240)
        base = f"http://127.0.0.1:{s.api_port}"

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

            # A browser signs in once with ?token=; the cookie does the rest.
            response = await page.goto(f"{base}/dashboard?token={TOKEN}")
            assert response is not None and response.status == 200
            assert page.url == f"{base}/dashboard"
            for chart in ("chart-funnel", "chart-grades", "chart-success-grade", "chart-success-decile"):
                assert await page.locator(f"#{chart} svg rect.bar").count() > 0, chart
            assert await page.locator("#chart-accuracy svg").count() + await page.locator("#chart-accuracy .empty").count() == 1
            rows = page.locator("#best-leads tr")
            assert await rows.count() > 2
            assert await page.locator("#owners tr").count() == len(OWNERS) + 1
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            # Filter by owner: every row is that owner's.
            owner = OWNERS[1]
            await page.select_option("#f-owner", owner)
            async with page.expect_navigation():
                await page.click("#f-apply")
            assert "owner=" in page.url
            owners_shown = await page.locator("#best-leads tr td:nth-child(5)").all_inner_texts()
            assert owners_shown and set(owners_shown) == {owner}
            await page.select_option("#f-stage", "new")
            async with page.expect_navigation():
                await page.click("#f-apply")
            stages_shown = await page.locator("#best-leads tr td:nth-child(4)").all_inner_texts()
            assert set(stages_shown) <= {"new"}

            # The lead page: its score history as a chart and a table.
            async with page.expect_navigation():
                await page.goto(f"{base}/dashboard?owner={owner}")
            first = page.locator("#best-leads a").first
            lead_id = await first.inner_text()
            async with page.expect_navigation():
                await first.click()
            assert lead_id in await page.title()
            assert await page.locator("#chart-history svg polyline").count() == 1
            assert await page.locator("#history tr").count() > 1
            await browser.close()
        assert problems == []
    finally:
        stop(api)
