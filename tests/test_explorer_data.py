"""The explorer's data, without a browser: quantisation bound, the budget plan, the template, the CLI's help."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from vitattn.cli import app
from vitattn.explorer import PATCH_LEVELS, PREFIX_LEVELS, plan_page, quantise, render_template


@pytest.mark.parametrize("levels", [PATCH_LEVELS, PREFIX_LEVELS])
def test_quantised_rows_are_within_the_stated_bound(levels: int) -> None:
    torch.manual_seed(0)
    rows = torch.softmax(torch.randn(3, 7, 201) * 4, dim=-1)  # (H, R, N) attention rows, peaky
    codes, top = quantise(rows, levels)
    assert codes.shape == rows.shape and top.shape == rows.shape[:-1]
    decoded = codes.double() * top.double()[..., None] / levels  # as the page reads them
    bound = top.double()[..., None] / (2 * levels)  # what the page states
    err = (decoded - rows.double()).abs()
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert float(err.max()) > 0.25 * float(bound.min())  # codes are not exact: the bound is what holds
    assert int(codes.max()) == levels  # each row's maximum gets the top code


def test_plan_keeps_the_last_blocks_that_fit() -> None:
    g = 14 * 14
    n = 2 + g
    per_patch = 4 * ((6 * g * n + 2) // 3) + 4 * ((6 * g * 4 + 2) // 3)
    plan = plan_page(range(12), heads=6, prefix=2, grid=(14, 14), fixed=100_000, budget=100_000 + 64 * 1024
                     + 12 * 20_000 + 3 * per_patch)
    assert plan.prefix_blocks == tuple(range(12))
    assert plan.patch_blocks == (11, 10, 9)  # the last block first
    none = plan_page(range(12), heads=6, prefix=2, grid=(14, 14), fixed=100_000, budget=200_000)
    assert none.patch_blocks == ()


def test_template_data_cannot_close_its_script() -> None:
    page = render_template("index.html", {"rows": [{"input": "</script><script>alert(1)</script>"}], "out": "x"},
                           "t</title>")
    m = re.search(r'<script type="application/json" id="vitattn-data">(.*?)</script>', page, re.S)
    assert m and json.loads(m.group(1))["rows"][0]["input"].startswith("</script>")
    assert "t&lt;/title&gt;" in page and "/*__DATA__*/" not in page


def test_explore_help_lists_its_options() -> None:
    result = CliRunner().invoke(app, ["explore", "--help"])
    assert result.exit_code == 0
    for flag in ("--explore-budget", "--open", "--method", "--query", "--block", "--json"):
        assert flag in result.stdout
    assert "--html" in CliRunner().invoke(app, ["heatmap", "--help"]).stdout
