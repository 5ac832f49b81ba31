"""LongBench / LongBench-E on local JSONL files (nothing is downloaded).

Give a directory holding LongBench's files, one per dataset: `{dataset}.jsonl` (LongBench) or
`{dataset}_e.jsonl` (LongBench-E), each line a JSON object with at least `context`, `input`,
`answers` (list of str), and for classification `all_classes`, for LongBench-E `length` (the
word count LongBench ships). Each sample is run as LongBench's `pred.py` does for base models:

1. prompt = the dataset's published template (`PROMPTS`) formatted with the sample;
2. if the tokenized prompt exceeds `max_length` tokens, keep the first and last
   max_length // 2 tokens (middle truncation);
3. greedy generation of the dataset's published answer length (`MAX_NEW_TOKENS`);
   samsum's answer is cut at its first newline (LongBench stops generation there);
4. the dataset metric (`longbench_metrics`), best over the reference answers.

Scores are means × 100 per dataset; LongBench-E also reports them per length bucket of the
sample's `length` field: 0-4k, 4-8k, 8k+.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from longmamba_evals.tasks.longbench_metrics import score_prediction
from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import Runner, as_runner, decode_generated, generate_all, progress

__all__ = ["MAX_NEW_TOKENS", "PROMPTS", "build_prompt", "load_dataset", "run_longbench"]

_QA_TAIL = ("Answer the question based on the given passages. Only give me the answer and do "
            "not output any other words.")
_QASPER_RULES = (
    "Answer the question as concisely as you can, using a single phrase or sentence if "
    "possible. If the question cannot be answered based on the information in the article, "
    "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
    "\"unanswerable\". Do not provide any explanation.")
_NARR = ("Answer the question as concisely as you can, using a single phrase if possible. "
         "Do not provide any explanation.")

# LongBench's published prompts (config/dataset2prompt.json).
PROMPTS: dict[str, str] = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a "
                    "question. " + _NARR + "\n\nStory: {context}\n\nNow, answer the question "
                    "based on the story as concisely as you can, using a single phrase if "
                    "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. " + _QASPER_RULES
               + "\n\nArticle: {context}\n\n Answer the question based on the above article as "
               "concisely as you can, using a single phrase or sentence if possible. If the "
               "question cannot be answered based on the information in the article, write "
               "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
               "or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\n"
               "Answer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer "
                        "the following question based on the above text, only give me the "
                        "answer and do not output any other words.\n\nQuestion: {input}\n"
                        "Answer:"),
    "multifieldqa_zh": ("阅读以下文字并用中文简短回答：\n\n{context}\n\n"
                        "现在请基于上面的文章回答下面的问题，"
                        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": _QA_TAIL + "\n\nThe following are given passages.\n{context}\n\n" + _QA_TAIL
    + "\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": _QA_TAIL + "\n\nThe following are given passages.\n{context}\n\n" + _QA_TAIL
    + "\n\nQuestion: {input}\nAnswer:",
    "musique": _QA_TAIL + "\n\nThe following are given passages.\n{context}\n\n" + _QA_TAIL
    + "\n\nQuestion: {input}\nAnswer:",
    "dureader": ("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n"
                 "请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of "
                   "the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the "
                   "report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or "
              "instruction. Answer the query in one or more sentences.\n\nTranscript:\n"
              "{context}\n\nNow, answer the query based on the above meeting transcript in one "
              "or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. "
                   "\n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\n"
                   "Summary:"),
    "vcsum": ("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n"
              "会议记录：\n{context}\n\n会议总结："),
    "trec": ("Please determine the type of the question below. Here are some examples of "
             "questions.\n\n{context}\n{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and "
                 "do not output any other words. The following are some examples.\n\n{context}"
                 "\n\n{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some "
               "examples.\n\n{context}\n\n{input}"),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may "
                      "be duplicates. Please carefully read these paragraphs and determine how "
                      "many unique paragraphs there are after removing duplicates. In other "
                      "words, how many non-repeating paragraphs are there in total?\n\n"
                      "{context}\n\nPlease enter the final count of unique paragraphs after "
                      "removing duplicates. The output format should only contain the number, "
                      "such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. "
                             "Please determine which paragraph the abstract is from.\n\n"
                             "{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease "
                             "enter the number of the paragraph that the abstract is from. The "
                             "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc."
                             "\n\nThe answer is: "),
    "passage_retrieval_zh": ("以下是若干段落文字，以及其中一个段落的摘要。"
                             "请确定给定的摘要出自哪一段。\n\n{context}\n\n"
                             "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。"
                             "答案格式必须是\"段落1\"，"
                             "\"段落2\"等格式\n\n答案是："),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench's published answer lengths (config/dataset2maxlen.json).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
    "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}
LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
               "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc",
               "repobench-p")
BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))


def load_dataset(data_dir: str, dataset: str, *, e: bool = False,
                 limit: int | None = None) -> list[dict]:
    """Reads `{data_dir}/{dataset}.jsonl` (or `{dataset}_e.jsonl` when `e`).

    Raises:
        ValueError: on an unknown dataset, or a line without context/input/answers.
        FileNotFoundError: if the file is missing.
    """
    if dataset not in PROMPTS:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(PROMPTS)}")
    path = os.path.join(data_dir, f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LongBench file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            for key in ("context", "input", "answers"):
                if key not in row:
                    raise ValueError(f"{path}:{n}: missing field {key!r}")
            if e and "length" not in row:
                raise ValueError(f"{path}:{n}: LongBench-E needs the 'length' field")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def build_prompt(tokenizer, dataset: str, sample: dict, max_length: int) -> tuple[np.ndarray, int]:
    """Tokenized, middle-truncated prompt, and the length of its part after the context.

    Returns:
        (tokens int [<= max_length], tail): `tail` = tokens after `{context}` (the question),
        which DeciMamba keeps.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    template = PROMPTS[dataset]
    prompt = template.format(context=sample["context"], input=sample["input"])
    ids = tokenizer.encode(prompt)
    if len(ids) > max_length:
        # LongBench decodes both halves and re-joins the text; at the token level we keep the
        # tokens themselves, which is the same prompt without a decode/encode round trip.
        half = max_length // 2
        ids = ids[:half] + ids[len(ids) - half:]
    tail_text = template.split("{context}", 1)[1].format(input=sample["input"])
    tail = min(len(tokenizer.encode(tail_text)), len(ids))
    return np.asarray(ids, dtype=np.int64), max(1, tail)


def run_longbench(runner: Runner, tokenizer, method: MethodSpec | None = None, *,
                  data_dir: str, datasets: Sequence[str] | None = None, e: bool = False,
                  max_length: int = 7_500, limit: int | None = None,
                  max_new_tokens: int | None = None, show_progress: bool = True) -> dict:
    """Runs LongBench (or LongBench-E) scoring on local JSONL files for one method.

    Args:
        runner: the model: `longmamba_jax.Params`, an `LMRunner` or any `Runner`.
        tokenizer: the model's tokenizer.
        method: the method (None: vanilla).
        data_dir: directory with `{dataset}.jsonl` / `{dataset}_e.jsonl`.
        datasets: dataset names (default: every known dataset with a file in `data_dir`).
        e: LongBench-E (files `*_e.jsonl`, length buckets).
        max_length: prompt token budget (middle truncation beyond it).
        limit: at most this many samples per dataset.
        max_new_tokens: override every dataset's answer length (for quick runs).
        show_progress: show a progress bar.

    Returns:
        The result dict: score per dataset (and bucket for -E), every sample.
    """
    runner = as_runner(runner, tokenizer)
    method = method or MethodSpec("vanilla")
    if datasets is None:
        suffix = "_e.jsonl" if e else ".jsonl"
        datasets = [d for d in PROMPTS if os.path.isfile(os.path.join(data_dir, d + suffix))]
        if not datasets:
            raise FileNotFoundError(f"no LongBench files ({'{dataset}' + suffix}) in {data_dir!r}")
    data = {d: load_dataset(data_dir, d, e=e, limit=limit) for d in datasets}
    eos = getattr(tokenizer, "eos_token_id", None)
    bar = progress(total=sum(map(len, data.values())), desc=f"longbench/{method.name}",
                   enabled=show_progress)
    samples = []
    for d, rows in data.items():
        gen = int(max_new_tokens or MAX_NEW_TOKENS[d])
        for i, row in enumerate(rows):
            tokens, tail = build_prompt(tokenizer, d, row, max_length)
            method_obj = method.build(runner.n_layer, keep_last=tail)
            (ids,) = generate_all(runner, [tokens], gen, method_obj, bar=bar)
            pred = decode_generated(tokenizer, ids, eos)
            if d == "samsum":
                pred = pred.split("\n", 1)[0]
            answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
            samples.append({
                "dataset": d, "index": i, "prompt_len": int(len(tokens)),
                "length": row.get("length"), "expected": answers, "produced": pred,
                "score": score_prediction(d, pred, answers, row.get("all_classes")),
            })
    bar.close()
    return _summarize(samples, list(datasets), e, method, tokenizer, max_length)


def _summarize(samples, datasets, e, method, tokenizer, max_length) -> dict:
    def mean(rows):
        return round(100.0 * float(np.mean([r["score"] for r in rows])), 2) if rows else float(
            "nan")

    scores = {d: mean([s for s in samples if s["dataset"] == d]) for d in datasets}
    if e:
        columns = ["dataset"] + [b[0] for b in BUCKETS] + ["all"]
        rows, curves = [], {}
        xs = [b[2] if b[2] != float("inf") else 2 * b[1] for b in BUCKETS]  # plot positions
        for d in datasets:
            cells = [mean([s for s in samples if s["dataset"] == d and lo <= s["length"] < hi])
                     for _, lo, hi in BUCKETS]
            rows.append([d] + cells + [scores[d]])
            curves[d] = {"x": xs, "y": cells}
        avg = [float(np.nanmean([r[j + 1] for r in rows])) for j in range(len(BUCKETS))]
        curves = {"mean": {"x": xs, "y": avg}, **curves}
    else:
        columns = ["dataset", "score", "samples"]
        rows = [[d, scores[d], sum(s["dataset"] == d for s in samples)] for d in datasets]
        curves = {}
    rows.append(["mean"] + ([float(np.nanmean([r[j] for r in rows])) for j in
                             range(1, len(columns))] if e else
                            [float(np.mean(list(scores.values()))), len(samples)]))
    return {
        "task": "longbench_e" if e else "longbench",
        "method": method.name,
        "metric": "score",
        "settings": {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                     "datasets": datasets, "max_length": max_length, **method.settings()},
        "scores": scores,
        "curves": curves,
        "table": {"columns": columns, "rows": rows},
        "samples": samples,
    }
