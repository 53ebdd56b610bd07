"""`vitattn models --all` / `--summary` and `vitattn info`'s adapter lines: data on stdout, the figure on stderr."""

from __future__ import annotations

import json

import timm
from typer.testing import CliRunner

from vitattn.cli import app
from vitattn.coverage import coverage


def invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_models_all_lists_every_architecture_with_status_and_reason() -> None:
    code, stdout, _ = invoke(["models", "--all"])
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert code == 0 and len(rows) == len(timm.list_models()) and all(len(r) == 3 for r in rows)
    by_name = {name: (state, why) for name, state, why in rows}
    assert by_name["cait_xxs24_224"] == ("supported", "class-attention")
    assert by_name["swin_tiny_patch4_window7_224"] == ("supported", "swin")
    assert by_name["vit_dwee_patch16_reg1_gap_256"][0] == "refused"
    assert "differential attention" in by_name["vit_dwee_patch16_reg1_gap_256"][1]
    assert by_name["resnet50"] == ("refused", "no softmax attention over image tokens")
    assert {n for n, (s, _) in by_name.items() if s == "supported"} == set(invoke(["models"])[1].split())


def test_models_summary_counts_by_family() -> None:
    code, stdout, stderr = invoke(["models", "--summary"])
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert code == 0 and lines[0] == ["family", "supported_tags", "tags", "supported_archs", "archs"]
    families = {row[0]: [int(v) for v in row[1:]] for row in lines[1:]}
    c = coverage()
    assert families["total"] == [c.supported_tags, c.attention_tags, c.supported_archs, c.attention_archs]
    assert families["eva"][0] == families["eva"][1] and families["maxxvit"][0] == 0
    assert sum(v[1] for k, v in families.items() if k != "total") == c.attention_tags
    assert f"({100 * c.fraction:.1f}%)" in stderr


def test_info_names_the_adapter_and_its_blocks() -> None:
    code, stdout, _ = invoke(["info", "vit_base_patch16_siglip_224", "--json"])
    d = json.loads(stdout)
    assert code == 0 and d["adapter"] == "vit" and d["default_query"] == "pool" and d["depth"] == 13
    assert d["sites"][-1] == {
        "block": 12,
        "module": "attn_pool",
        "kind": "pool",
        "heads": 12,
        "prefix_tokens": [],
        "queries": ["pool"],
        "grid": [14, 14],
    }
    code, stdout, _ = invoke(["info", "cait_xxs24_224"])
    assert code == 0 and "adapter        class-attention" in stdout
    assert "blocks 0..1    blocks_token_only.0.attn .. blocks_token_only.1.attn: class attention" in stdout
