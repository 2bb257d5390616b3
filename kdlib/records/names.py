"""The words the records and every table use: methods, their order, knobs and their values, a run's
folder name, a setting of the teachers' quality or the student's width."""
from __future__ import annotations

import re

NAMES = {"camkd": "CAMKD", "vanilla": "vanilla", "aver": "AVER", "ebkd": "EBKD", "aekd": "AEKD",
         "label_smoothing": "label smoothing", "scratch": "scratch"}
METHOD_ORDER = list(NAMES)  # how methods are listed and paired: camkd - X and X - scratch
TEACHERLESS = ("scratch", "label_smoothing")  # students that never see a teacher
KNOB_WORDS = {"temperature": "T", "label_smoothing": "eps"}  # a knob's name beside its value


def method_rank(method: str) -> float:
    """A method's place in ``METHOD_ORDER`` (an unknown one after all of them); a
    variant (``camkd[beta=0]``, ``kdlib.analysis.sweep_results``) right after its method."""
    base = method.split("[")[0]
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return rank + 0.5 * (base != method)


def format_value(value) -> str:
    """A value as it appears in a run folder name: 10.0 -> 10, [a, b] -> a+b, a pair
    [[0, 6], [2, 4]] -> 0-6+2-4, a mapping {teacher_resnet: 0.4} -> teacher_resnet-0.4."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join("-".join(map(format_value, v)) if isinstance(v, list) else format_value(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{format_value(v)}" for k, v in value.items())
    return str(value)


def run_name(own: dict) -> str:
    """``beta=10,alpha=0.5`` from the keys a run sets itself, sanitised for a folder name."""
    name = ",".join(f"{k}={format_value(v)}" for k, v in own.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def value_words(value) -> str:
    """A knob's value for a label: '1.12' (three significant digits), '100', 'official'; the
    record keeps the full value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:g}" if number.is_integer() else f"{number:.3g}"


def knob_words(key: str, value) -> str:
    """'T 1.12', 'alpha 0.111', 'beta 0', 'eps 0.296': a knob and its value, shortened for a label."""
    return f"{KNOB_WORDS.get(key, key)} {value_words(value)}"


def method_words(method: str) -> str:
    """A method (or its variant, ``camkd[beta=0]``) in words, with no '=': 'CAMKD (beta 0)',
    'CA-MKD official (alpha 1, beta 50)', 'vanilla (T 1.05, alpha 0.111)', 'label smoothing'."""
    base, _, rest = method.partition("[")
    parts = [knob_words(*v.split("=", 1)) for v in rest.rstrip("]").split(",") if v]
    name = NAMES.get(base, base)
    if base == "camkd" and "camkd_form official" in parts:
        name, parts = "CA-MKD official", [v for v in parts if v != "camkd_form official"]
    return name + (f" ({', '.join(parts)})" if parts else "")


def short_name(P: dict) -> str:
    """A setting of the teachers' quality and the student's width in a few words (the column headers):
    'shipped', 'noisy resnet', 'swapped resnet', 'small student + swapped resnet'."""
    words = [f"noisy {t.removeprefix('teacher_')}" for t in (P.get("teacher_label_noise") or {})]
    words += [f"swapped {t.removeprefix('teacher_')}" for t in (P.get("teacher_class_swap") or {})]
    if float(P.get("student_width", 1.0)) != 1.0:
        words.insert(0, "small student")
    return " + ".join(words) or "shipped"


def degraded(P: dict) -> list[str]:
    """The teachers a setting degrades (label noise or swapped classes)."""
    return list(dict.fromkeys([*(P.get("teacher_label_noise") or {}), *(P.get("teacher_class_swap") or {})]))


def _swaps(pairs) -> str:
    return ", ".join(f"{a}↔{b}" for a, b in pairs)


def describe(P: dict) -> str:
    """What sets a setting apart, in words: 'teacher_resnet with classes 0↔6, 2↔4 swapped;
    student width 0.25'."""
    words = [f"{t} trained on {100 * f:g} % wrong labels" for t, f in (P.get("teacher_label_noise") or {}).items()]
    words += [f"{t} with classes {_swaps(p)} swapped" for t, p in (P.get("teacher_class_swap") or {}).items()]
    if float(P.get("student_width", 1.0)) != 1.0:
        words.append(f"student width {P['student_width']:g}")
    return "; ".join(words) or "the shipped teachers, the seed's student"
