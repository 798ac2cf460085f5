"""Zero-shot evaluation that agrees with lm-evaluation-harness, fast on CPU.

    from dietprune.evaluate import evaluate, evaluate_spec, perplexity
    evaluate(model, tokenizer, "boolq,arc_easy", limit=200)  -> {"tasks": {...}, "meta": {...}}
    perplexity(model, tokenizer, max_tokens=8192)            -> float
"""

from .runner import evaluate, evaluate_spec, perplexity

__all__ = ["evaluate", "evaluate_spec", "perplexity"]
