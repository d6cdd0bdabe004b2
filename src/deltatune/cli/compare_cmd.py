"""``deltatune compare runs/a runs/b …``: gain, retention, calibration and cost side by side."""
from __future__ import annotations

from pathlib import Path

from deltatune.evaluation.report import base_mismatch, html_report, load_run, plots, text_table
from deltatune.utils.io import atomic_path, write_json_atomic, write_text_atomic


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare runs side by side: gain, forgetting, calibration, cost (table, plots, HTML)")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>, with eval.json from 'deltatune eval --out' or summary.json)")
    p.add_argument("--html", help="write a self-contained HTML report (table and plots inline) here")
    p.add_argument("--plots", help="directory for the plots as PNG files")
    p.add_argument("--json", help="write the rows as JSON here")
    p.set_defaults(run=run)


def run(args) -> int:
    rows = [load_run(r) for r in args.runs]
    print(text_table(rows))
    note = base_mismatch(rows)
    if note:
        print(f"note: {note}")
    if args.html or args.plots:
        images = plots(rows)
        if args.plots:
            for name, png in images.items():
                with atomic_path(Path(args.plots) / f"{name}.png") as tmp:
                    tmp.write_bytes(png)
        if args.html:
            write_text_atomic(args.html, html_report(rows, images))
            print(f"report: {args.html}")
    if args.json:
        write_json_atomic(args.json, [{k: v for k, v in r.items() if k != "curve"} for r in rows])
    return 0
