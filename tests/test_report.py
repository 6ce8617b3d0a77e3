"""report: Markdown numbers and the plots' legends."""

from ld_jax import report


def test_legend_keeps_labels_that_start_with_an_underscore(tmp_path, monkeypatch):
    # "_Yes" is how the tables write " Yes"; matplotlib would silently drop it from the legend.
    closed = []
    monkeypatch.setattr(report.plt, "close", closed.append)
    panel = report.Panel(
        "tokens", [report.Series("_Yes", [0.0, 1.0]), report.Series("No", [[1.0, 0.0], [0.5, 0.0]])]
    )
    path = report.plot_panels(tmp_path / "p.png", [panel])
    texts = [t.get_text().lstrip("\u200b") for t in closed[0].axes[0].get_legend().get_texts()]
    assert texts == ["_Yes", "No"] and path.stat().st_size > 0


def test_format_number_switches_to_scientific_for_tiny_and_huge_values():
    assert [report.format_number(x) for x in (0.5, 0.004, 2e5, 0.0, None)] == [
        "0.50",
        "4.0e-03",
        "2.0e+05",
        "0.00",
        "–",
    ]
