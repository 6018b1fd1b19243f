"""Make docs/report.png, the README's picture of `batchrun report --html`.

Runs jobs/eval_sweep.toml against its built-in fake (told to answer some requests with 429,
5xx or 400, and to vary its latency, so that every chart has something to show), writes the
report page, and takes headless Chromium's screenshot of it, shrunk with pngquant if there.

    .venv/bin/python scripts/report_screenshot.py [OUT.png]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from batchrun.job import build_job, read_job_data
from batchrun.report import read_report, scan_rows
from batchrun.report_html import write_html
from batchrun.runner import run_job

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "eval_sweep.toml"
#: flags that run Chromium headless here, as root, with nothing reaching past the machine
#: (every host name resolves to nothing, so a page that fetched a script would show no chart);
#: the browser tests (tests/test_report_html.py) run it with these too
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
#: the README's picture: the page as a reader's window shows it
SCREENSHOT_FLAGS = (*CHROMIUM_FLAGS, "--hide-scrollbars", "--window-size=1200,1600")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "report.png"
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        data = read_job_data(JOB)
        data["output"] = f"{tmp}/eval_sweep.parquet"
        data["limits"] = {**data.get("limits", {}), "concurrency": 8, "max_attempts": 3}
        data["limits"] |= {"initial_backoff": 0.05, "max_backoff": 0.2}
        data["fake"] = {
            "latency": 0.05,
            "latency_jitter": 0.15,
            "fail_rate": 0.06,
            "faults": ["429", "500", "503", "400"],
            "retry_after": 0.3,
            "seed": 14,
        }
        run_job(build_job(data, source=JOB), restart=True)
        output = Path(data["output"])
        page = Path(tmp) / "report.html"
        write_html(
            read_report(output),
            scan_rows(output),
            page,
            title="batchrun report: eval_sweep.parquet",
        )
        shot = Path(tmp) / "report.png"
        subprocess.run(
            [
                chromium,
                *SCREENSHOT_FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--screenshot={shot}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("pngquant"):
            subprocess.run(
                ["pngquant", "--force", "--quality=60-85", "--output", str(out), str(shot)],
                check=True,
            )
        else:
            shutil.copyfile(shot, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")  # noqa: T201


if __name__ == "__main__":
    main()
