"""tinyllm's benchmarks: `python -m benchmarks.<name>` (see benchmarks/README.md).

    e2e         tinyllm beside transformers and llama.cpp, end to end, plus NumPy's GEMV ceiling
    components  RoPE, QKV projection, attention scores, causal mask, full attention by sequence length
    scaling     decode tok/s against context length, prefill tok/s against prompt length (+ PNG)

Each writes a JSON file (every raw repeat) and a Markdown table (medians) into --out.
"""
