"""The rollout viewer: the data embedded in the page (pure Python), `npr view`, and the page as Chromium draws it."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import npr.cli.view  # noqa: F401  (registers `npr view`)
from npr.cli import app
from npr.engine import ParallelEngine, SamplingParams, save_rollouts
from npr.format import STEP, STEP_END
from npr.model import tiny_model
from npr.viz import render_page
from tests.scripted import Script

CHROMIUM = Path("/usr/bin/chromium")
DATA = re.compile(r'<script id="npr-data" type="application/json">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def tokenizer_and_rollouts():
    """A parallel answer with forks of 3 and 2, the same format decoded sequentially, and one cut inside a
    block (its first branch never reached </step>)."""
    model, tok = tiny_model(seed=0)
    engine = ParallelEngine(model, tok)
    prompt = [tok("what is 2+3?", add_special_tokens=False)["input_ids"]]
    scripted = SamplingParams(
        seed=1, max_new_tokens=400, logits_processors=[Script(tok, [[2, 5, 3], [4, 1]])]
    )
    cut = SamplingParams(seed=1, max_new_tokens=40, logits_processors=[Script(tok, [[20, 3]])])
    rollouts = [
        *engine.generate(prompt, scripted),
        *engine.generate(prompt, scripted, mode="sequential"),
        *engine.generate(prompt, cut),
    ]
    assert [r.stats.branches for r in rollouts] == [5, 0, 2]
    assert not rollouts[2].blocks[0].branches[0].finished
    return tok, rollouts


def embedded(page: str) -> dict:
    return json.loads(DATA.search(page).group(1))


def nodes(graph: dict) -> list[dict]:
    return [n for p in graph["parts"] for n in (p["branches"] if p["kind"] == "block" else [p])]


def test_page_data_draws_every_branch_and_the_critical_path(tokenizer_and_rollouts):
    tok, rollouts = tokenizer_and_rollouts
    data = embedded(render_page(rollouts, tok))
    assert len(data["rollouts"]) == 3
    for r, d in zip(rollouts, data["rollouts"], strict=True):
        all_nodes = nodes(d["graph"])
        branches = [n for n in all_nodes if n["kind"] == "branch"]
        assert len(branches) == r.stats.branches
        # Every response token is in exactly one node, and the critical nodes add up to the critical path.
        assert sum(n["length"] for n in all_nodes) == len(r.token_ids)
        assert sum(n["length"] for n in all_nodes if n["critical"]) == r.stats.critical_path_tokens
        assert "".join(n["text"] for n in all_nodes) == tok.decode(r.token_ids, skip_special_tokens=False)
        for b in branches:
            assert b["text"].startswith(STEP) and b["text"].endswith(STEP_END) == b["finished"]
        assert d["layout"]["source"] == "build_layout" and d["layout"]["positions"] == r.position_ids
    first = data["rollouts"][0]["graph"]["parts"]
    assert [len(p["branches"]) for p in first if p["kind"] == "block"] == [3, 2]
    assert [p["takeaway_position"] for p in first if p["kind"] == "block"] == [
        b.takeaway_position for b in rollouts[0].blocks
    ]


def test_without_a_tokenizer_the_engine_records_give_the_same_picture(tokenizer_and_rollouts):
    tok, rollouts = tokenizer_and_rollouts
    with_tok, without = embedded(render_page(rollouts, tok)), embedded(render_page(rollouts))
    for a, b in zip(with_tok["rollouts"], without["rollouts"], strict=True):
        assert b["layout"]["source"] == "records"
        assert {k: v for k, v in a["layout"].items() if k != "source"} == {
            k: v for k, v in b["layout"].items() if k != "source"
        }
        assert all(n["text"] is None for n in nodes(b["graph"]))
    hidden = with_tok["rollouts"][0]["layout"]["hidden"]
    assert hidden and all(row >= len(rollouts[0].prompt_ids) for row, _, _ in hidden)
    assert with_tok["rollouts"][1]["layout"]["hidden"] == []  # sequential: plain causal


def test_page_is_self_contained(tokenizer_and_rollouts):
    tok, rollouts = tokenizer_and_rollouts
    page = render_page(rollouts, tok)
    assert "http" not in page  # no URL at all: the SVG is built from markup, no namespace URI needed
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(""", page)


def test_rollout_text_cannot_break_out_of_the_page(tokenizer_and_rollouts):
    tok, rollouts = tokenizer_and_rollouts
    hostile = dataclasses.replace(rollouts[0], text="</script><script>alert(1)</script> <!-- &amp;")
    page = render_page([hostile], tok, title="a <b> title")
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the drawing code
    assert "alert(1)</script>" not in page and "<b> title" not in page
    assert embedded(page)["rollouts"][0]["text"] == hostile.text


def test_cli_view_writes_the_page(tokenizer_and_rollouts, tmp_path):
    _, rollouts = tokenizer_and_rollouts
    save_rollouts(rollouts, tmp_path / "r.jsonl")
    result = CliRunner().invoke(app, ["view", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p.html")])
    assert result.exit_code == 0, result.output
    assert "3 rollouts, 7 branches" in result.output
    data = embedded((tmp_path / "p.html").read_text())
    assert data["title"] == "r.jsonl" and data["rollouts"][0]["layout"]["source"] == "records"


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (CI installs it: apt-get install chromium)"
)
def test_chromium_draws_the_graph(tokenizer_and_rollouts, tmp_path):
    tok, rollouts = tokenizer_and_rollouts
    page = tmp_path / "page.html"
    page.write_text(render_page(rollouts, tok))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
    ]
    dom = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count('data-kind="branch"') == sum(r.stats.branches for r in rollouts) == 7
    drawn = re.findall(
        r'<svg width="\d', dom
    )  # rendered graphs (the script's own "<svg" template is not one)
    assert dom.count('class="rollout"') == 3 and len(drawn) == 3
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), *flags, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as im:
        assert im.width >= 640 and im.height >= 480
        colors = im.convert("RGB").getcolors(maxcolors=4096)  # None: more than 4096 colours
        assert colors is None or len(colors) > 20, "a blank page"
