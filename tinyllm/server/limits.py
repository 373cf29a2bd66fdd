"""What a request body may cost before any work is done on it.

A server reads bytes from strangers, so every step from bytes to a Python dict is bounded:
- the body's size: `Content-Length` is checked before anything is read, and a body sent in
  chunks is counted while it arrives (413 naming the limit), within a time limit (408);
- its encoding: strictly UTF-8, as JSON requires (400 naming the first bad byte);
- its shape: JSON nested deeper than `max_json_depth` levels (400), since nesting costs
  recursion in the parser and in every walk over the result;
- its numbers: integers of more than 64 bits, floats that overflow to infinity and the
  non-standard `NaN`/`Infinity` literals Python's parser accepts (400 naming the field);
- its strings: `\\ud800`-style escapes that leave lone surrogates, which are not text
  and which the tokenizer would refuse later, deep inside the model's work (400).

`read_body` runs on the event loop (it only waits for bytes); `parse_body` is CPU work on
up to `max_body_bytes` and runs in a worker thread (see app.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import anyio

from .openai import APIError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * MiB
    body_timeout: float = 30.0        # seconds to receive the whole body once the headers are in
    max_json_depth: int = 32          # an OpenAI request needs about 5 (messages[i].content[j].text)


async def read_body(request, limits: Limits) -> bytes:
    """The request's body, at most `limits.max_body_bytes` of it."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body: {int(declared)} bytes is more than the server's limit of {limit} "
                       f"bytes (--max-body-bytes)", "body", code="body_too_large")
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body: more than the server's limit of {limit} bytes "
                                   f"(--max-body-bytes)", "body", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body: not received within {limits.body_timeout:g} s", "body",
                       code="body_timeout") from None
    return b"".join(chunks)


class _Refused:
    """Stands in the parsed tree for a number that was refused, so that the walk afterwards
    can name the field it was found in (the parser's hooks do not know where they are)."""

    def __init__(self, why: str):
        self.why = why


def _parse_int(text: str):
    # Python's own guard (4300 digits) is far above any field's range; 20 digits is 64 bits.
    if len(text.lstrip("-")) > 20 or not -2**64 < int(text) < 2**64:
        return _Refused(f"an integer of {len(text.lstrip('-'))} digits is out of range (at most 64 bits)")
    return int(text)


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:20]}... does not fit a 64-bit float")


def _parse_constant(name: str):
    return _Refused(f"{name} is not a JSON number")


def parse_body(raw: bytes, limits: Limits) -> dict:
    """Bytes -> the request's JSON object, every limit above checked; APIError(400) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                       "body") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body: malformed JSON ({e})", "body") from None
    except RecursionError:  # deeper than the parser's own recursion allows
        raise APIError(400, f"request body: JSON nested deeper than {limits.max_json_depth} levels", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {type(body).__name__}", "body")
    check_values(body, limits.max_json_depth)
    return body


def check_values(body: dict, max_depth: int) -> None:
    """Walk the parsed body for the depth, refused numbers and lone surrogates; the error
    names the path, and its top-level key as the param. The walk keeps one iterator per
    open container (no recursion to exhaust, memory in the depth, not in the size: a
    million-number list costs no million paths), and builds the path only to name a problem."""
    frames, keys = [iter(body.items())], [None]  # per open container: its items, the key now looked at
    while frames:
        try:
            keys[-1], value = next(frames[-1])
        except StopIteration:
            frames.pop()
            keys.pop()
            continue
        problem = None
        if isinstance(value, (dict, list)):
            if len(frames) < max_depth:
                frames.append(iter(value.items()) if isinstance(value, dict) else enumerate(value))
                keys.append(None)
                continue
            problem = f"JSON nested deeper than {max_depth} levels"
        elif isinstance(value, _Refused):
            problem = value.why
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                problem = f"not valid Unicode (a lone surrogate \\u{ord(value[e.start]):04x})"
        if problem:
            param = keys[0]
            path = param + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[1:])
            raise APIError(400, f"{param}: {problem}" if path == param else f"{param}: {path}: {problem}", param)
