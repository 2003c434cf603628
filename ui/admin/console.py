"""Admin › SQL: one read-only query on the feedback log, its result, and the result as CSV."""

from __future__ import annotations

import csv
import json
import os
import tempfile

import gradio as gr

from chatloop.errors import ChatloopError
from ui.admin.context import AdminContext
from ui.common import table

EXAMPLE = "SELECT adapter_version, count(*) AS replies FROM generations GROUP BY 1"


def console(ctx: AdminContext) -> None:
    sql_box = gr.Textbox(label="SQL (read-only)", lines=3, value=EXAMPLE, elem_id="admin-sql")
    run = gr.Button("Run query", elem_id="admin-sql-run")
    result = gr.Dataframe(label="Result", interactive=False, visible=False, elem_id="admin-sql-result")
    download = gr.File(label="Download CSV", visible=False, elem_id="admin-sql-csv")
    msg = gr.Markdown("")

    def query(ok, q):
        ctx.guard(ok)
        try:
            res = ctx.service.sql(q)
        except ChatloopError as exc:
            return gr.update(visible=False), f"⚠️ {exc}", gr.update(visible=False)
        # the service's JSON values; a LIST or STRUCT shows as its JSON text in a cell
        rows = [[json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for v in r]
                for r in res["rows"]]
        note = f"{len(rows)} row(s)" + (" (truncated)" if res["truncated"] else "")
        fd, path = tempfile.mkstemp(prefix="chatloop-query-", suffix=".csv")
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(res["columns"])
            writer.writerows(rows)
        return gr.update(value=table(res["columns"], rows), visible=True), note, gr.update(value=path, visible=True)

    run.click(query, [ctx.signed_in, sql_box], [result, msg, download])
