"""Tests for npr.model: tag tokens, the tiny model and its tokenizer, atomic save/load, custom 4D masks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from npr.format import TAGS, TagIds
from npr.model import add_tag_tokens, load_model, save_model, tag_word, tiny_model, train_tiny_tokenizer

NEG = torch.finfo(torch.float32).min


def untagged_pair(vocab_size: int | None = None, tie: bool = True):
    """A tiny model and tokenizer without the tags, as a pretrained seed checkpoint comes."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer())
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config), tokenizer


def assert_rows_are_subtoken_means(model, tokenizer, tag_ids: TagIds) -> None:
    weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    for tag, tag_id in zip(TAGS, tag_ids.as_tuple(), strict=True):
        sub_ids = tokenizer(tag_word(tag), add_special_tokens=False)["input_ids"]
        assert sub_ids and tag_id not in sub_ids
        for weight in weights:
            torch.testing.assert_close(weight[tag_id], weight[sub_ids].mean(dim=0), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- tag tokens


@pytest.mark.parametrize("tie", [True, False])
def test_add_tag_tokens_inits_rows_to_subtoken_mean(tie):
    model, tokenizer = untagged_pair(tie=tie)
    n_before = len(tokenizer)
    tag_ids = add_tag_tokens(model, tokenizer)
    assert len(tokenizer) == n_before + len(TAGS)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert sorted(tag_ids.as_tuple()) == list(range(n_before, n_before + len(TAGS)))
    assert_rows_are_subtoken_means(model, tokenizer, tag_ids)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tie
    # open and close rows differ because the closing word keeps its "/"
    assert not torch.equal(embed[tag_ids.step_open], embed[tag_ids.step_close])


def test_add_tag_tokens_uses_spare_rows_without_resizing():
    model, tokenizer = untagged_pair(vocab_size=len(train_tiny_tokenizer().get_vocab()) + 40, tie=False)
    n_rows = model.get_input_embeddings().weight.shape[0]
    tag_ids = add_tag_tokens(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == n_rows
    assert max(tag_ids.as_tuple()) < n_rows
    assert_rows_are_subtoken_means(model, tokenizer, tag_ids)


def test_add_tag_tokens_is_idempotent():
    model, tokenizer = tiny_model(seed=3, tie_word_embeddings=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_tokens = len(tokenizer)
    first = TagIds.from_tokenizer(tokenizer)
    assert add_tag_tokens(model, tokenizer) == first
    assert len(tokenizer) == n_tokens
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_tag_tokens_encode_to_one_special_id_each():
    _, tokenizer = tiny_model()
    tag_ids = TagIds.from_tokenizer(tokenizer)
    for tag, tag_id in zip(TAGS, tag_ids.as_tuple(), strict=True):
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [tag_id]
        assert tag in tokenizer.all_special_tokens
    ids = tokenizer("x<plan>1: add</plan>y", add_special_tokens=False)["input_ids"]
    assert ids.count(tag_ids.plan_open) == 1 and ids.count(tag_ids.plan_close) == 1


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_tokenizer_trains_fast_and_deterministically():
    start = time.perf_counter()
    first = train_tiny_tokenizer()
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"tokenizer training took {elapsed:.2f} s"
    assert first.to_str() == train_tiny_tokenizer().to_str()


def test_tiny_tokenizer_splits_digits_and_round_trips_text():
    _, tokenizer = tiny_model()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert tokens == ["1", "2", "3", "4", "5"]
    text = "x = 12 * 3 + 0.5, naïve ☃ \\boxed{36.5}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_tiny_model_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a, tok_a = tiny_model(seed=1)
    assert torch.equal(torch.rand(3), expected_draw)
    b, tok_b = tiny_model(seed=1)
    c, _ = tiny_model(seed=2)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_tiny_model_config():
    model, tokenizer = tiny_model(hidden_size=32, num_attention_heads=4, num_key_value_heads=1)
    config = model.config
    assert config.head_dim == 8 and config.max_position_embeddings == 4096
    assert config._attn_implementation == "sdpa"
    assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    assert_rows_are_subtoken_means(model, tokenizer, TagIds.from_tokenizer(tokenizer))


def test_tiny_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny_model(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="vocab_size must be >="):
        tiny_model(vocab_size=10)


def test_chat_template_renders_qwen_turns():
    _, tokenizer = tiny_model()
    messages = [{"role": "user", "content": "What is 2+3?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert plain == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- save / load


def logits_of(model, tokenizer, text: str = "<guideline><plan>1: add 2 and 3</plan></guideline>"):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tie):
    model, tokenizer = tiny_model(seed=5, tie_word_embeddings=tie)
    target = save_model(model, tokenizer, tmp_path / "ckpt")
    loaded, loaded_tok = load_model(target)
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert TagIds.from_tokenizer(loaded_tok) == TagIds.from_tokenizer(tokenizer)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert torch.equal(logits_of(loaded, loaded_tok), logits_of(model, tokenizer))


def test_save_model_replaces_a_model_folder_and_leaves_no_temp(tmp_path):
    first, tokenizer = tiny_model(seed=1)
    second, _ = tiny_model(seed=2)
    save_model(first, tokenizer, tmp_path / "ckpt")
    save_model(second, tokenizer, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(logits_of(loaded, tokenizer), logits_of(second, tokenizer))


def test_interrupted_save_keeps_the_old_folder(tmp_path, monkeypatch):
    model, tokenizer = tiny_model(seed=1)
    save_model(model, tokenizer, tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_save_model_refuses_to_replace_other_folders(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    model, tokenizer = tiny_model()
    with pytest.raises(FileExistsError, match="notes"):
        save_model(model, tokenizer, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_load_model_names_a_missing_or_non_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        load_model(tmp_path)


def test_load_model_adds_missing_tags(tmp_path: Path):
    model, tokenizer = untagged_pair(tie=False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    tag_ids = TagIds.from_tokenizer(loaded_tok)
    assert loaded.get_input_embeddings().weight.shape[0] == len(loaded_tok) == len(tokenizer) + len(TAGS)
    assert_rows_are_subtoken_means(loaded, loaded_tok, tag_ids)


# ---------------------------------------------------------------------------------------------- 4D masks


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), NEG).triu(1)[None, None]  # [1, 1, L, L]


def test_custom_causal_4d_mask_matches_default_forward():
    model, tokenizer = tiny_model(seed=7)
    ids = torch.tensor(
        [tokenizer("<guideline><plan>1: add 12 and 35</plan></guideline><step>1:")["input_ids"]]
    )
    length = ids.shape[1]
    with torch.no_grad():
        default = model(ids).logits
        custom = model(
            ids, attention_mask=causal_mask(length), position_ids=torch.arange(length)[None]
        ).logits
    torch.testing.assert_close(custom, default, rtol=0, atol=1e-5)


def test_custom_4d_mask_is_honoured_row_by_row():
    model, tokenizer = tiny_model(seed=7)
    ids = torch.tensor([tokenizer("one two three four five six")["input_ids"]])
    length = ids.shape[1]
    mask = causal_mask(length)
    mask[0, 0, 4, 1] = NEG  # query 4 no longer sees key 1
    positions = torch.arange(length)[None]
    with torch.no_grad():
        causal = model(ids, attention_mask=causal_mask(length), position_ids=positions).logits
        blocked = model(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(blocked[:, :4], causal[:, :4], rtol=0, atol=1e-6)
    assert (blocked[:, 4] - causal[:, 4]).abs().max() > 1e-4
