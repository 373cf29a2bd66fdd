"""Solutions to the exercises of docs/11-generation-and-streaming.md;
`python docs/solutions/11_generation_and_streaming.py`.

1. Streamed pieces always add up to the decoded text, token by token, on generated text.
2. A stop string ends the text before it, and the finish reason says so.
"""
import tinyllm
from tinyllm.detokenize import StreamingDetokenizer


def main():
    llm = tinyllm.load()
    done = llm.generate("The capital of France is", max_new_tokens=8)
    stream = StreamingDetokenizer(llm.tokenizer)
    pieces = [stream.add(i) for i in done.token_ids] + [stream.flush()]
    assert "".join(pieces) == llm.tokenizer.decode(done.token_ids)
    print(f"1. {len(done.token_ids)} tokens streamed into {sum(bool(p) for p in pieces)} non-empty pieces: "
          "they add up to the decoded text")

    stopped = llm.generate("The capital of France is", max_new_tokens=8, stop=["\n"])
    full = llm.tokenizer.decode(done.token_ids)
    assert "\n" not in stopped.text and full.startswith(stopped.text + "\n") and stopped.finish_reason == "stop"
    print(f"2. stop at a newline: {stopped.text!r}, finish reason {stopped.finish_reason!r}")


if __name__ == "__main__":
    main()
