"""Generators for the string formats of dlpipe's OpenAPI document that JSON Schema cannot
check (serving/kinds.py): `dlpipe-image` (base64 of a PNG or JPEG) and `dlpipe-masked-text`
(a text with [MASK], within the model's token limit). Schemathesis loads this module as
its hooks (SCHEMATHESIS_HOOKS=benchmarks.fuzzing.formats), so the requests it means to be
valid are valid, and a 4xx to one of them is the server's fault, not the generator's.

The token limit comes from DLPIPE_FUZZ_MAX_TOKENS (benchmarks/fuzz.py reads it from the
served document's `x-max-tokens`).
"""

from __future__ import annotations

import base64
import io
import os

import schemathesis
from hypothesis import strategies as st

MASK = "[MASK]"


@st.composite
def png_or_jpeg(draw: st.DrawFn) -> str:
    from PIL import Image

    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1"]))
    fill = draw(st.integers(0, 255))
    image = Image.new("L", (width, height), fill).convert(mode)
    kind = "JPEG" if mode in ("L", "RGB") and draw(st.booleans()) else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@st.composite
def masked_text(draw: st.DrawFn) -> str:
    """Words and punctuation around at least one [MASK]; each of these characters is at
    most one token of a WordPiece tokenizer, so a text of n characters (a [MASK] counting
    one) is at most n tokens."""
    budget = int(os.environ.get("DLPIPE_FUZZ_MAX_TOKENS", "62"))
    # Latin scripts only: a Hangul syllable, say, becomes three characters when the
    # tokenizer's normalizer decomposes it, and could exceed the budget counted here.
    word = st.text(
        st.characters(max_codepoint=0x24F, exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"]),
        min_size=1,
        max_size=8,
    )
    pieces = draw(st.lists(st.one_of(st.just(MASK), word), max_size=budget))
    pieces.insert(draw(st.integers(0, len(pieces))), MASK)
    text, used = [], 0
    for piece in pieces:
        cost = 1 if piece == MASK else len(piece)
        if used + cost > budget:
            continue
        text.append(piece)
        used += cost
    if MASK not in text:
        text.append(MASK)
    return " ".join(text)


def register() -> None:
    schemathesis.openapi.format("dlpipe-image", png_or_jpeg())
    schemathesis.openapi.format("dlpipe-masked-text", masked_text())


register()  # this module is a schemathesis hooks module: loading it is its purpose
