"""Inputs JSON Schema cannot describe, drawn by hypothesis: images that are truncated,
empty, 16-bit, CMYK, animated, or decompression bombs; texts with lone surrogates, NUL
characters, 500 [MASK]s, or nothing but special tokens; nesting and numbers that strain
the JSON parser. Each is sent as raw bytes: the server must answer 2xx or a 4xx whose
detail names the offending field, never a 5xx.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from benchmarks.fuzzing.formats import png_or_jpeg


@dataclass(frozen=True)
class Hostile:
    name: str
    path: str
    bodies: st.SearchStrategy[bytes]
    field: str
    """What a 4xx's detail must name (a 400 for a body that does not parse names the
    line and column instead)."""


def _json_images(images: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return images.map(lambda raw: b'{"images": ["' + base64.b64encode(raw) + b'"]}')


def _json_texts(texts: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    import json

    # ensure_ascii: characters travel as \\u escapes, lone surrogates included.
    return texts.map(lambda text: json.dumps({"texts": [text]}).encode())


def _png(mode: str, size: tuple[int, int], **save: object) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new(mode, size)
    image.save(buffer, "PNG" if mode != "CMYK" else "JPEG", **save)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a width x height greyscale picture, with a tiny compressed
    body: what a decompression bomb looks like (or, at 0 pixels, an empty image)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * min(width + 1, 1 << 16) * 16, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def _animated() -> bytes:
    from PIL import Image

    frames = [Image.new("L", (8, 8), shade) for shade in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _truncated(draw_image: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return st.tuples(draw_image, st.floats(0.0, 0.95)).map(
        lambda pair: base64.b64decode(pair[0])[: int(len(base64.b64decode(pair[0])) * pair[1])]
    )


IMAGES = st.one_of(
    _truncated(png_or_jpeg()),
    st.integers(0, 1).map(lambda side: _png_claiming(side, side)),  # 0x0, 1x1
    st.integers(5_000, 200_000).map(lambda side: _png_claiming(side, side)),  # bombs
    st.sampled_from(["I;16", "LA", "P", "1", "CMYK"]).map(lambda mode: _png(mode, (9, 7))),
    st.just(b"").map(lambda _: _animated()),
    st.binary(max_size=64),
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = st.one_of(
    st.text(st.characters(codec=None, categories=["Cs"]), min_size=1, max_size=4).map(
        lambda surrogates: f"a {surrogates} [MASK]"
    ),
    st.integers(1, 40).map(lambda n: "\x00" * n + " [MASK]"),
    st.integers(100, 600).map(lambda n: " ".join(["[MASK]"] * n)),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=30).map(" ".join),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=30).map("".join),
)

PARSER = st.one_of(
    st.integers(1_000, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1_000, 200_000).map(lambda depth: b'{"instances": ' + b"[" * depth),
    st.sampled_from([b"1e999", b"-1e999", b"1" * 5000, b"0." + b"0" * 5000 + b"1"]).map(
        lambda number: b'{"instances": [[' + number + b"]]}"
    ),
)

CASES: tuple[Hostile, ...] = (
    Hostile("hostile images", "/v1/classify", _json_images(IMAGES), "images"),
    Hostile("hostile texts (fill-mask)", "/v1/fill-mask", _json_texts(TEXTS), "texts"),
    Hostile("hostile texts (embed)", "/v1/embed", _json_texts(TEXTS), "texts"),
    Hostile("JSON parser strain", "/v1/classify", PARSER, "instances"),
)


def _names_the_problem(status: int, text: str, field: str) -> bool:
    """A 4xx names the field; a body that is not JSON at all (400) names where it breaks."""
    return field in text or (status == 400 and ("column" in text or "JSON" in text))


def run_case(case: Hostile, post: Callable[[str, bytes], tuple[int, str]], examples: int) -> dict:
    """`examples` bodies of `case` through `post` (path, body -> status, response text);
    counts, and the first few answers that broke the rules."""
    from hypothesis import HealthCheck, given, settings

    counts = {"cases": 0, "5xx": 0, "4xx": 0, "2xx": 0, "unnamed_field": 0}
    broken: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case.bodies)
    def send(body: bytes) -> None:
        status, text = post(case.path, body)
        counts["cases"] += 1
        counts[f"{status // 100}xx"] = counts.get(f"{status // 100}xx", 0) + 1
        if status >= 500:
            broken.append(f"{status} for {body[:120]!r}: {text[:200]}")
        elif 400 <= status < 500 and not _names_the_problem(status, text, case.field):
            counts["unnamed_field"] += 1
            broken.append(f"{status} does not name {case.field!r}: {text[:200]}")

    send()
    return {**counts, "broken": broken[:5]}
