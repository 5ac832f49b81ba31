"""LongBench metrics and the RULER string match on hand-made examples."""

import pytest

from longmamba_evals.tasks.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l,
    rouge_score,
    score_prediction,
)
from longmamba_evals.tasks.ruler import string_match_all


def test_normalize_answer_squad_rules():
    assert normalize_answer("An apple, the  Pear!") == "apple pear"
    assert normalize_answer("Theater") == "theater"  # "the" only as a whole word


def test_qa_f1():
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    assert qa_f1_score("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0
    # Repeated tokens count with multiplicity: pred [x, b, b], ref [b]: p=1/3, r=1.
    assert qa_f1_score("x b b", "b") == pytest.approx(0.5)


def test_rouge_l_single_and_multi_sentence():
    s = rouge_l("the cat sat on the mat", "the cat sat")
    assert s["r"] == pytest.approx(1.0)
    assert s["p"] == pytest.approx(3 / 5)  # unique hypothesis words: the cat sat on mat
    assert s["f"] == pytest.approx(0.75, abs=1e-6)
    # Summary level: each reference sentence takes its LCS against every hypothesis sentence.
    assert rouge_score("the dog ran. the cat sat", "the cat sat. the dog ran") == pytest.approx(
        1.0, abs=1e-6)
    assert rouge_score("", "the cat sat") == 0.0
    assert rouge_score("...", "the cat sat") == 0.0
    assert rouge_score("completely different", "the cat sat") == 0.0


def test_classification_rules():
    classes = ["Numeric", "Numeric value", "Human"]
    assert classification_score("Numeric value", "Numeric value", all_classes=classes) == 1.0
    assert classification_score("Human or Numeric value", "Numeric value",
                                all_classes=classes) == 0.5
    assert classification_score("Human", "Numeric value", all_classes=classes) == 0.0
    assert classification_score("nothing", "Human", all_classes=classes) == 0.0
    # LongBench removes substrings of the reference while iterating, which skips the next one.
    assert classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("x", "y", all_classes=[])


def test_retrieval_and_count():
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("no idea", "Paragraph 12") == 0.0
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_score("1", "twelve")
    assert count_score("There are 7 unique paragraphs", "7") == 1.0
    assert count_score("7 or 8", "7") == 0.5
    assert count_score("seven", "7") == 0.0


def test_code_edit_similarity():
    assert code_sim_score("```python\n    return x + 1\n```", "    return x + 1") == 1.0
    # Lines with #, // or ``` are skipped; "return y" vs "return x": 2·7/16 = 87.5 -> 88.
    assert code_sim_score("# comment\nreturn y", "return x") == pytest.approx(0.88)
    assert code_sim_score("\n\nreturn x", "return x") == 1.0
    assert code_sim_score("// all comments", "return x") == 0.0
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0


def test_score_prediction_dataset_rules():
    classes = ["Human", "Location"]
    # trec/triviaqa/samsum/lsht score the first line only.
    assert score_prediction("trec", "Human\nLocation", ["Human"], classes) == 1.0
    assert score_prediction("trec", "\nLocation\nHuman", ["Human"], classes) == 0.0
    # Best over the references.
    assert score_prediction("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    assert score_prediction("passage_count", "5", "5") == 1.0
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        score_prediction("nope", "a", ["a"])
    with pytest.raises(ValueError, match="no reference"):
        score_prediction("hotpotqa", "a", [])


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123.", ["123", "456"]) == 0.5
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    with pytest.raises(ValueError):
        string_match_all("x", [])
