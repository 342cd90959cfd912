"""Text as the paper's models write it: the official engine and prompt put newlines between tags
(`</guideline>\\n<step>\\n1:`). Such text is valid input; `canonicalize` removes the whitespace between tags
and trims every text before the text is tokenised for training (`npr.train.sequences.encode_response`).

The trajectories below were written for these tests in the style of the paper's Appendix D examples
(multi-plan blocks, a second verifying block, a final boxed answer), not copied from it."""

from __future__ import annotations

import pytest

from npr.format import TagIds, canonicalize, check, parse
from npr.layout import build_layout
from npr.model import tiny_model
from npr.train.sequences import encode_response

REMAINDER = r"""<guideline>
<plan>1: Use the cycle of the powers of 2 modulo 7.</plan>
<plan>2: Use Fermat's little theorem to reduce the exponent.</plan>
</guideline>
<step>
1: The powers of 2 modulo 7 are 2, 4, 1 and repeat with period 3. Since 100 = 3 * 33 + 1, we get 2^100 = 2^1 = 2 (mod 7).
</step>
<step>
2: By Fermat, 2^6 = 1 (mod 7). Since 100 = 6 * 16 + 4, we get 2^100 = 2^4 = 16 = 2 (mod 7).
</step>
<takeaway>
Both methods give remainder 2, so the result is consistent.
</takeaway>

<guideline>
<plan>1: Check the period directly from 2^3.</plan>
</guideline>
<step>
1: 2^3 = 8 = 1 (mod 7), so 2^99 = (2^3)^33 = 1 and 2^100 = 2 (mod 7).
</step>
<takeaway>
The direct check agrees with both earlier steps.
</takeaway>

The remainder when $2^{100}$ is divided by $7$ is $\boxed{2}$."""

DIVISORS = r"""<guideline>
<plan>1: Factor 360 into primes and use the divisor-count formula.</plan>
<plan>2: Count divisor pairs (d, 360/d) with d below the square root.</plan>
<plan>3: Build the divisors from the factors of 8 and of 45.</plan>
</guideline>
<step>
1: 360 = 2^3 * 3^2 * 5, so the number of divisors is (3+1)(2+1)(1+1) = 24.
</step>
<step>
2: The divisors below sqrt(360) = 18.97 are 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 18: twelve of them, and 360 is not a square, so there are 2 * 12 = 24 divisors.
</step>
<step>
3: 360 = 8 * 45 with gcd 1; 8 has 4 divisors and 45 has 6, so 360 has 4 * 6 = 24.
</step>
<takeaway>
All three counts agree on 24.
</takeaway>

So 360 has $\boxed{24}$ positive divisors."""

ZEBRA = r"""<guideline>
<plan>1: Place Bob using the first clue.</plan>
<plan>2: Eliminate the choices that contradict the clues.</plan>
</guideline>
<step>
1: Bob lives in house 1, so the only person left for house 2 is Alice.
</step>
<step>
2: Choice B (Bob) is impossible because Bob is in house 1; only choice A remains.
</step>
<takeaway>
Both steps point to Alice, which is choice A.
</takeaway>

The person in house 2 is Alice: \boxed{A}"""

CASES = [(REMAINDER, "2", [2, 1]), (DIVISORS, "24", [3]), (ZEBRA, "A", [2])]


@pytest.mark.parametrize(("text", "answer", "widths"), CASES)
def test_official_style_trajectories_parse_cleanly(text: str, answer: str, widths: list[int]) -> None:
    report = check(text)
    assert report.issues == () and report.penalty == 0.0
    t = parse(text)
    assert t.answer == answer
    assert [len(b.plans) for b in t.blocks] == widths
    assert all(p.id == s.id for b in t.blocks for p, s in zip(b.plans, b.steps, strict=True))


def test_canonical_form_has_no_whitespace_between_tags() -> None:
    canonical = canonicalize(REMAINDER)
    assert canonical.startswith("<guideline><plan>1: Use the cycle")
    assert "</plan><plan>2: Use Fermat" in canonical
    assert "</guideline><step>1: The powers" in canonical and "(mod 7).</step><step>2: By Fermat" in canonical
    assert "</step><takeaway>Both methods" in canonical and "consistent.</takeaway><guideline>" in canonical
    assert canonical.endswith("</takeaway>The remainder when $2^{100}$ is divided by $7$ is $\\boxed{2}$.")
    assert canonicalize(canonical) == canonical and parse(canonical) == parse(REMAINDER)


@pytest.mark.parametrize(("text", "answer", "widths"), CASES)
def test_official_text_becomes_canonical_training_ids(text: str, answer: str, widths: list[int]) -> None:
    _, tok = tiny_model()
    tags = TagIds.from_tokenizer(tok)
    ids = encode_response(tok, text)
    assert ids == [*tok(canonicalize(text), add_special_tokens=False)["input_ids"], tok.eos_token_id]
    newline = set(tok("\n", add_special_tokens=False)["input_ids"])
    tag_ids = set(tags.as_tuple())
    between = [b for a, b in zip(ids, ids[1:], strict=False) if a in tag_ids and b in newline]
    assert between == []  # no newline token right after any tag
    layout = build_layout(ids, tags, prompt_len=0)
    assert int(layout.block.max()) + 1 == len(widths)
