"""LongBench metrics, re-implemented without third-party scorers (same numbers as LongBench).

Per dataset (LongBench `eval.py`), a prediction's score is the max over the reference answers;
for trec, triviaqa, samsum and lsht only the first line of the prediction counts. Scores are
in [0, 1]; datasets report the mean × 100.

- `qa_f1_score`: token F1 after SQuAD normalization (lowercase, drop punctuation, drop the
  articles a/an/the, collapse whitespace).
- `rouge_score`: ROUGE-L F of the `rouge` package LongBench uses (summary-level union LCS over
  sentences split at "."; words are counted as sets, as that package does; 0 when either side
  has no sentence).
- `classification_score`: the classes named in the prediction, minus those that are a proper
  substring of the reference; 1/len(matches) if the reference is among them, else 0 (LongBench's
  difflib fallback is unreachable in its code and so is not applied here either).
- `retrieval_score`: the fraction of numbers in the prediction equal to the reference paragraph
  number ("Paragraph N").
- `count_score`: the fraction of numbers in the prediction equal to the reference count.
- `code_sim_score`: the first prediction line without ```, # or //, compared with
  `difflib.SequenceMatcher` ratio rounded to a whole percent (fuzzywuzzy's `fuzz.ratio`
  without python-Levenshtein; identical strings 1, an empty side 0).
- `qa_f1_zh_score`, `rouge_zh_score`, `retrieval_zh_score`: the Chinese variants (the first two
  need `jieba` for word segmentation and raise a clear error without it).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "DATASET_METRIC",
    "classification_score",
    "code_sim_score",
    "count_score",
    "normalize_answer",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l",
    "rouge_score",
    "score_prediction",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(string.punctuation) | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
    "〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(s: str) -> str:
    """Lowercase, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _normalize_zh(s: str) -> str:
    return "".join("".join(ch for ch in s.lower() if ch not in _ZH_PUNCT).split())


def _f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token-level F1 between normalized prediction and reference."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as e:
        raise ValueError("the Chinese LongBench metrics need the 'jieba' package "
                         "(pip install jieba)") from e
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Token F1 over jieba words with Chinese punctuation removed."""
    p = [t for t in (_normalize_zh(w) for w in _jieba_cut(prediction)) if t]
    g = [t for t in (_normalize_zh(w) for w in _jieba_cut(ground_truth)) if t]
    return _f1(p, g)


def _sentences(text: str) -> list[str]:
    # The `rouge` package: split at ".", keep non-empty raw pieces, collapse their whitespace.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence of x and y (the `rouge` package's backtrack order)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, ground_truth: str) -> dict[str, float]:
    """ROUGE-L (summary level) as the `rouge` package computes it: {"f", "p", "r"}.

    Raises:
        ValueError: when either text has no sentence (the caller scores that 0).
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        raise ValueError("ROUGE-L needs at least one sentence on each side")
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    hits = 0
    for r in ref:
        before = len(union)
        r_words = r.split(" ")
        for h in hyp:
            union |= set(_lcs_words(r_words, h.split(" ")))
        hits += len(union) - before
    recall, precision = hits / m, hits / n
    f = 2.0 * (precision * recall) / (precision + recall + 1e-8)
    return {"f": f, "p": precision, "r": recall}


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F; 0 when a side is empty."""
    try:
        return rouge_l(prediction, ground_truth)["f"]
    except ValueError:
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F over jieba-segmented words."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str],
                         **_) -> float:
    """1/len(matches) when the reference class is among the classes named in the prediction."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the dataset's class names)")
    matches = [c for c in all_classes if c in prediction]
    # LongBench removes, while iterating, classes that are a proper substring of the reference;
    # removing during iteration skips the element after each removal. Reproduced exactly.
    i = 0
    while i < len(matches):
        c = matches[i]
        if c in ground_truth and c != ground_truth:
            matches.remove(c)  # removes the first equal element, then the loop moves on
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_fraction(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(target) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of numbers in the prediction equal to N of the reference "Paragraph N"."""
    m = re.findall(r"Paragraph (\d+)", ground_truth)
    if not m:
        raise ValueError(f"retrieval reference {ground_truth!r} has no 'Paragraph N'")
    return _number_fraction(prediction, m[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of numbers in the prediction equal to N of the reference "段落N"."""
    m = re.findall(r"段落(\d+)", ground_truth)
    if not m:
        raise ValueError(f"retrieval reference {ground_truth!r} has no '段落N'")
    return _number_fraction(prediction, m[0])


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of numbers in the prediction equal to the reference count."""
    return _number_fraction(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` (pure-python path): round(100 · SequenceMatcher ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Edit similarity of the first code line of the prediction with the reference line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


Metric = Callable[..., float]

DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_prediction(dataset: str, prediction: str, answers: Sequence[str],
                     all_classes: Sequence[str] | None = None) -> float:
    """A prediction's LongBench score in [0, 1]: the best over the reference answers.

    Args:
        dataset: a LongBench dataset name (e.g. "hotpotqa").
        prediction: the model's answer.
        answers: reference answers.
        all_classes: the class names (classification datasets only).

    Raises:
        ValueError: on an unknown dataset or no answers.
    """
    if dataset not in DATASET_METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; "
                         f"known: {', '.join(DATASET_METRIC)}")
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError(f"{dataset}: a sample has no reference answers")
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    return max(metric(prediction, gt, all_classes=all_classes) for gt in answers)
