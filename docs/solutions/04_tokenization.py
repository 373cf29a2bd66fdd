"""Solutions to the exercises of docs/04-tokenization.md; `python docs/solutions/04_tokenization.py`.

1. Bytes per token for English, code, and text in other scripts: how much the vocabulary
   compresses each.
2. decode(encode(text)) gives the text back, whatever the characters.
"""
import tinyllm

TEXTS = {
    "English": "The quick brown fox jumps over the lazy dog because the dog was asleep.",
    "Python": "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Chinese": "敏捷的棕色狐狸跳过了懒狗，因为狗睡着了。",
    "emoji": "🦙🦙🦙 🐕‍🦺 🎉",
}


def main():
    tok = tinyllm.load().tokenizer
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        print(f"1. {name:8} {len(text.encode()):3} bytes -> {len(ids):3} tokens: "
              f"{len(text.encode()) / len(ids):.1f} bytes per token")
    print("2. every text decodes back to itself")


if __name__ == "__main__":
    main()
