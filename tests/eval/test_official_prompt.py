"""Released checkpoints: the paper's official prompt (tag strings become tag ids, as its tokenizer makes them),
an opaque prompt for the layout and the engine, chat-template options, and checkpoints refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from npr.cli import app
from npr.data import OFFICIAL_PROMPTS_ENV, build_prompt, build_prompt_text, instruction
from npr.engine import FinishReason, ParallelEngine, SamplingParams
from npr.eval.checkpoint import CheckpointError, require_tags, resolve_checkpoint
from npr.eval.harness import PromptSpec
from npr.format import TAGS, TagIds
from npr.layout import PROMPT, build_layout
from npr.model import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, tiny_model, train_tiny_tokenizer
from tests.scripted import Script
from tests.test_engine_parity import assert_parity

QUESTION = "What is 2 + 3?"


# Stand-ins for the release's prompt files (npr does not ship the authors' text): what matters here is how
# they are read and tokenised, tag strings included.
STAND_IN = {
    "npr.txt": "Answer in the format: <guideline><plan>1: ...</plan> (more plans)</guideline>, then one "
    "<step>1: ...</step> per plan, each blind to the others, then a <takeaway>...</takeaway>; finish with "
    "\\boxed{}.",
    "cot.txt": "Think it through and put the final answer in \\boxed{}.",
}


@pytest.fixture(autouse=True)
def official_prompts(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "official-prompts"
    folder.mkdir(exist_ok=True)
    for name, text in STAND_IN.items():
        (folder / name).write_text(text)
    monkeypatch.setenv(OFFICIAL_PROMPTS_ENV, str(folder))
    return folder


def test_the_official_prompt_names_the_variable_when_it_is_missing(monkeypatch) -> None:
    monkeypatch.delenv(OFFICIAL_PROMPTS_ENV)
    with pytest.raises(ValueError, match=f"{OFFICIAL_PROMPTS_ENV}.*evals/prompts"):
        instruction(True, "official")


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    return model, tok, TagIds.from_tokenizer(tok)


def test_official_prompt_turns_tag_strings_into_tag_ids(tiny) -> None:
    _, tok, tags = tiny
    ids = build_prompt(tok, QUESTION, style="official")
    text = build_prompt_text(tok, QUESTION, style="official")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the whole chat in one call, as released
    assert set(tags.as_tuple()) <= set(ids)
    assert f"{QUESTION}\n\n{instruction(True, 'official')[:40]}" in text
    assert instruction(False, "official") == STAND_IN["cot.txt"]
    # A checkpoint whose own tokenizer has no tags (NPR-Zero) saw the tag strings as ordinary text.
    as_text = build_prompt(tok, QUESTION, style="official", tags_as_ids=False)
    assert not set(tags.as_tuple()) & set(as_text) and len(as_text) > len(ids)


def test_layout_takes_the_prompt_as_opaque(tiny) -> None:
    _, tok, tags = tiny
    prompt = build_prompt(tok, QUESTION, style="official")
    text = "<guideline><plan>1: add</plan></guideline><step>1: 2+3=5</step><takeaway>so 5</takeaway>5"
    response = tok(text, add_special_tokens=False)["input_ids"]
    lay = build_layout(prompt + response, tags, len(prompt))
    assert (lay.segment[: len(prompt)] == PROMPT).all() and (lay.block[: len(prompt)] == -1).all()
    assert lay.position_ids[: len(prompt)].tolist() == list(range(len(prompt)))
    assert int(lay.block.max()) == 0  # the response's one block, and nothing from the prompt's tags


def test_decoding_from_the_official_prompt_keeps_parity(tiny) -> None:
    """Needs the engine to accept tag ids in a prompt: `ParallelEngine(..., allow_prompt_tags=True)`."""
    model, tok, tags = tiny
    engine = ParallelEngine(model, tok, allow_prompt_tags=True)
    prompt = build_prompt(tok, QUESTION, style="official")
    script = Script(tok, [[2, 4], [3]])

    def response_only(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        return script(visible[len(prompt) :], logits)  # the script reads structure after the prompt only

    params = SamplingParams(seed=1, max_new_tokens=200, logits_processors=[response_only])
    (r,) = engine.generate([prompt], params, mode="parallel")
    assert r.finish_reason == FinishReason.STOP, r.stop_reason
    assert r.prompt_ids == prompt and r.stats.forks == 2
    assert_parity(model, tags, r)


QWEN3_LIKE = CHAT_TEMPLATE.replace(
    "'<|im_start|>assistant\\n' -}}",
    "'<|im_start|>assistant\\n' -}}{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}",
)


def test_enable_thinking_reaches_the_chat_template(tiny) -> None:
    _, tok, _ = tiny
    tok.chat_template = QWEN3_LIKE
    try:
        off = build_prompt_text(tok, QUESTION, template={"enable_thinking": False})
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert not build_prompt_text(tok, QUESTION).endswith("</think>\n\n")

        class Holder:
            tokenizer = tok

        spec = PromptSpec(template={"enable_thinking": False})
        assert spec.build(Holder(), QUESTION, "parallel") == build_prompt(  # type: ignore[arg-type]
            tok, QUESTION, template={"enable_thinking": False}
        )
        assert spec.to_dict()["template"] == {"enable_thinking": False}
    finally:
        tok.chat_template = CHAT_TEMPLATE


def _tokenizer_folder(path: Path, tags: tuple[str, ...]) -> Path:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_tokenizer(),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    tok.add_tokens(list(tags), special_tokens=True)
    tok.save_pretrained(path)
    return path


def test_checkpoint_without_tag_tokens_is_refused_by_name(tmp_path: Path) -> None:
    none = _tokenizer_folder(tmp_path / "seed", ())
    with pytest.raises(
        CheckpointError, match=r"checkpoint .*seed: its tokenizer has no tag tokens \['<guideline>'"
    ):
        require_tags(str(none))
    partial = _tokenizer_folder(tmp_path / "partial", TAGS[:7])
    with pytest.raises(CheckpointError, match=r"no tag tokens \['</takeaway>'\]"):
        require_tags(str(partial))
    require_tags(str(_tokenizer_folder(tmp_path / "tagged", TAGS)))  # all 8: accepted
    fixtures = Path(__file__).parent.parent / "fixtures" / "bench"
    result = CliRunner().invoke(
        app, ["eval", "--bench", "aime24", "--model", str(none), "--data-dir", str(fixtures)]
    )
    assert result.exit_code == 2 and "</takeaway>" in result.output


def test_hub_id_offline_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"bigai-NPR/NPR-4B: not a local folder, and the hub is offline.*"
                       r"huggingface-cli download bigai-NPR/NPR-4B"):  # fmt: skip
        resolve_checkpoint("bigai-NPR/NPR-4B")
    with pytest.raises(CheckpointError, match=r"no such folder, and not a hub id"):
        resolve_checkpoint("no/such/folder/here")
    assert resolve_checkpoint("tiny") == "tiny" and resolve_checkpoint(str(tmp_path)) == str(tmp_path)
