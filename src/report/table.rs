//! The per-tensor HTML table.

use super::svg::esc;
use super::ReportModel;
use std::fmt::Write;

/// `<table>` of every tensor.
pub(crate) fn tensor_table(model: &ReportModel) -> String {
    let mut out = String::from("<table id=\"tensors\"><thead><tr>");
    for h in &model.table_header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>\n");
    for r in &model.table_rows {
        out.push_str("<tr>");
        for c in &r.cells {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
    out
}
