"""The way a streamed token goes back to its client: the Outbox that carries the scheduler's
events to the event loop (in order, with fewer wake-ups than events), and the SSE line of a
piece of text written from a frame encoded once per choice (the same bytes as encoding
the whole chunk, and the chunk OpenAI's format describes)."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")

from tinyllm.generate import StopRules  # noqa: E402
from tinyllm.sampler import SamplingParams  # noqa: E402
from tinyllm.server.app import Outbox  # noqa: E402
from tinyllm.server.openai import Chunks, Job, sse_line  # noqa: E402

TEXTS = ["", "a", " baker", 'say "hi"', "back\\slash", "new\nline\ttab", "\x00nul", "\x1f", "é", "中文", "🙂",
         "\u2028\u2029", "\ud7ff", "\x00piece\x00", '"}]}', "data: [DONE]\n\n"]


def job(kind: str) -> Job:
    return Job(kind, [[1, 2, 3]], SamplingParams(), StopRules(), stream=True)


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("model_id", ["tiny", 'a "quoted" \x00piece\x00 id'])
def test_piece_line_is_the_chunk_openai_describes(kind, model_id):
    fast = Chunks(job(kind), "rid-1", model_id, "fp")
    slow = Chunks(job(kind), "rid-1", model_id, "fp")
    for index in (0, 2):
        for text in TEXTS[1:]:  # a piece line carries text (the server sends no empty piece)
            line = fast.piece(text, index)
            assert line == sse_line(slow.text(text, index=index))
            assert line.startswith("data: ") and line.endswith("\n\n") and "\n" not in line[:-2]
            got = json.loads(line[len("data: "):])
            choice = ({"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                      if kind == "chat" else
                      {"index": index, "text": text, "logprobs": None, "finish_reason": None})
            assert got == {"id": "rid-1", "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": got["created"], "model": model_id, "system_fingerprint": "fp",
                           "choices": [choice]}
    # completions count each choice's text (the logprobs' text_offset); the frame's own encoding is not counted
    assert fast.offsets == slow.offsets
    if kind == "completion":
        assert fast.offsets == {i: sum(len(t) for t in TEXTS) for i in (0, 2)}


def test_outbox_delivers_in_order_with_fewer_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []

        class CountingLoop:
            def call_soon_threadsafe(self, fn, *args):
                wakeups.append(fn)
                return loop.call_soon_threadsafe(fn, *args)

        outbox = Outbox(CountingLoop())
        queues = [asyncio.Queue() for _ in range(4)]
        n = 2000

        def scheduler():  # a step's events posted back to back, as the scheduler thread does
            for i in range(n):
                outbox.post(queues[i % 4], i)

        thread = threading.Thread(target=scheduler)
        thread.start()
        got = [[] for _ in queues]
        while sum(map(len, got)) < n:
            for q, out in zip(queues, got):
                while not q.empty():
                    out.append(q.get_nowait())
            await asyncio.sleep(0.001)
        thread.join()
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    assert got == [list(range(k, 2000, 4)) for k in range(4)]
    assert 1 <= wakeups < 2000


def test_outbox_after_the_loop_closed_drops_quietly():
    loop = asyncio.new_event_loop()
    outbox = Outbox(loop)
    loop.close()
    outbox.post(asyncio.Queue(), "late")  # the server shut down: nobody is listening, nothing raises
