"""lm-eval hooks of the tinyreason tasks (`!function utils.<name>` in the YAMLs next to this file)."""

from fair_calib.benchmark.tinyreason_tasks import (
    load_test_split,
    process_answer_ll,
    process_compare,
    process_exact_match,
)


def load_addition(**kwargs):
    """custom_dataset: the shipped addition test split (lm-eval passes task metadata as kwargs; unused)."""
    return load_test_split("addition")


def load_word_problems(**kwargs):
    return load_test_split("word_problems")


def load_compare(**kwargs):
    return load_test_split("compare")


__all__ = ["load_addition", "load_word_problems", "load_compare", "process_exact_match", "process_answer_ll",
           "process_compare"]
