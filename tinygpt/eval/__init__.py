"""Evaluation: `harness.evaluate(...)` runs registered tasks on a model (+ adapters).

Task families: `ppl` (perplexity, bits-per-byte), `choice` (multiple choice and LAMBADA by
log-likelihood), `gen` (GSM8K, the synthetic set, IFEval, pairwise win rate), `ifeval` (checkers).
"""
