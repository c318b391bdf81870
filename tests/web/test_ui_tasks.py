"""The Tasks page in real headless Chromium against a real server: create a task (with an
attachment), watch its output arrive, cancel one, and a prompt answered by the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.conftest import import_file
from tests.web.browsing import browser, page, shot
from tests.web.tasking import data_dir

__all__ = ["browser", "data_dir", "page"]  # fixtures this module uses from browsing and tasking


def test_a_script_with_an_attachment_runs_and_its_output_shows(page: Page, tmp_path: Path) -> None:
    attached = tmp_path / "names.txt"
    attached.write_text("ann\nbob\n")
    page.goto("/#/tasks")
    expect(page.get_by_role("heading", level=1)).to_have_text("Tasks")
    page.locator("#task-mode").select_option("script")
    page.get_by_label("Text").fill("sort -r /work/names.txt; echo warned >&2")
    page.get_by_label("Attachments (scripts and commands: in /work)").set_input_files(attached)
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#task-state")).to_contain_text("succeeded (exited with status 0)")
    expect(page.locator("#task-stdout")).to_have_text("bob\nann\n")
    expect(page.locator("#task-stderr")).to_have_text("warned\n")
    expect(page.locator("#task-cancel")).to_be_disabled()
    expect(page.locator("#tasks-table tr[data-state='succeeded']")).to_have_count(1)
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "tasks")


def test_a_running_task_granted_a_tool_is_cancelled_from_the_page(page: Page) -> None:
    page.goto("/#/tasks")
    page.locator("#task-mode").select_option("commands")
    page.get_by_label("Text").fill("echo started $MCP_URL\nsleep 60")
    page.get_by_label("preference.get").check()
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#task-stdout")).to_have_text("started http://127.0.0.1:11434/mcp\n")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#task-state")).to_contain_text(re.compile(r"canceled \(canceled by "))
    expect(page.locator("#task-cancel")).to_be_disabled()


def test_a_prompt_is_answered_by_the_model(page: Page, data_dir: Path, tiny_gguf: Path) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    page.goto("/#/tasks")
    expect(page.locator("#task-model")).to_have_value("tiny:latest")
    page.get_by_label("Text").fill("Say hello")
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#task-state")).to_contain_text("succeeded (answered)", timeout=60_000)
    expect(page.locator("#task-stdout")).not_to_be_empty()


def test_a_refused_task_shows_the_servers_reason(page: Page) -> None:
    page.goto("/#/tasks")
    page.locator("#task-mode").select_option("script")
    page.get_by_label("Text").fill("   ")
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#errors")).to_contain_text("the task's script is empty")
