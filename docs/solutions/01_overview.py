"""Solutions to the exercises of docs/01-overview.md; `python docs/solutions/01_overview.py`.

1. The hand-written loop of chapter 1 chooses the tokens `llm.generate` chooses (greedy).
2. The loop runs one forward pass too many: the last chosen token is fed back though
   nothing reads its logits. Stopping before that call leaves one position fewer in the cache.
"""
import numpy as np

import tinyllm


def greedy(llm, ids, n_new, feed_last=True):
    cache = llm.model.new_cache(len(ids) + n_new)
    logits = llm.model.forward(np.array([ids]), cache)
    out = []
    for step in range(n_new):
        out.append(int(logits[0, -1].argmax()))
        if feed_last or step < n_new - 1:
            logits = llm.model.forward(np.array([[out[-1]]]), cache)
    return out, cache.length


def main():
    llm = tinyllm.load()
    prompt = "Once upon a time, a baker had a"
    ids = llm.tokenizer.encode(prompt)

    out, _ = greedy(llm, ids, 6)
    assert out == llm.generate(prompt, max_new_tokens=6).token_ids
    print("1. same tokens as llm.generate:", repr(llm.tokenizer.decode(out)))

    same, length = greedy(llm, ids, 6, feed_last=False)
    assert same == out and length == len(ids) + 6 - 1
    print(f"2. without the last call: the same tokens, {length} positions cached instead of {len(ids) + 6}")


if __name__ == "__main__":
    main()
