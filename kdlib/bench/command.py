"""Seconds per training epoch for each way of training the student.

    python -m kdlib bench [--samples N] [--teachers M [M ...]] [--methods NAME ...] [--precision fp32|bf16]
                          [--repeats R] [--json | --markdown] [--save FILE] [--readme docs/speed.md] [--book]

One process times ONE pass (one epoch, training steps only: no evaluation, no
checkpoint) over the same ``N`` class-balanced Fashion-MNIST training samples with
the settings of ``params/fashionmnist.yaml`` (batch 128, Adam lr 1e-3, T 4, alpha 0.7,
beta 100, hint_layer -2), for

* ``scratch``, ``vanilla``, ``camkd``: kdlib's loop, teachers served from the cache
  (``CachedTeachers``; camkd is timed in an epoch where its feature term is on);
* ``camkd_official``: the same with ``camkd_form: official`` (``CalWeight``: pooling or
  resizing, then a 1x1 ``Embed``, instead of ``ConvReg``'s 5x5 conv for teacher_vgg's
  3x3 map; the teachers' heads run with their graph);
* ``aver``, ``ebkd``, ``aekd``: the CA-MKD paper's baselines (``kdlib.train.distillers``),
  teacher logits from the cache as for vanilla; aekd's one-class SVM (scikit-learn)
  runs on the CPU once per batch; ``label_smoothing``: the student alone with smoothed
  labels;
* ``vanilla_live``, ``camkd_live``: the same, teachers run on every batch;
* ``scratch_crop``, ``vanilla_crop``, ``camkd_crop``: ``augment: crop``; vanilla's
  teacher logits on each image's view served from the view cache
  (``ViewCachedTeachers``; its one-off build, 25 evaluation passes per teacher, is
  reported apart as ``view_cache_build_s``), CAMKD's teachers run live (their hint
  maps on every view are not kept);
* ``seed_style``: the old seed kit's way: torchvision dataset with per-sample
  ``ToTensor``/``Normalize`` through a ``DataLoader``, default memory layout,
  teachers run live, vanilla KD loss computed the plain way, always fp32.

Teachers are randomly initialised, frozen and in eval mode: their accuracy does not
change the work a step does, so they are not trained for timing. Each method is
warmed up for a few steps first; with ``--repeats R`` > 1 the passes are interleaved
across methods (so a burst of load elsewhere hits them alike) and the fastest pass of
each method is reported. Ratios are taken within the one process.

Then each model (student, teachers) is timed training alone for a few steps and
evaluating the test samples: its FLOPs per training step (``FlopCounterMode``) over
its seconds per step give GFLOP/s, set beside what one fp32 matrix product reaches on
the same cores (``matmul_peak``: the limit dense work can aim at). The FLOPs of one
training step of each cache-served method give a lower bound on its ratio to scratch
(``ratio_bounds``: its extra FLOPs run at that peak, its memory-bound work free).
``--book`` turns the per-step and per-image times into an estimate of the whole book's
time (``book_estimate``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..train.models import TEACHERS
from ..records.files import cpu_name, update_readme
from .measure import (CROP_METHODS, DESCRIPTIONS, FLOP_METHODS, METHODS, PARAMS_FILE, RATIOS,  # noqa: F401
                      STEP_ROUNDS, TEACHER_NOTE, bench_params, book_estimate, chosen_methods, interleaved_steps,
                      matmul_peak, model_rates, prepare, ratio_bounds, run_benchmark, step_flops, step_ratios,
                      time_epoch, validate)


def format_book(book: dict) -> str:
    lines = [f"book estimate ({PARAMS_FILE.name}: {book['train_images']:,} training images, "
             f"{book['steps_per_epoch']} steps per epoch, {book['test_images']:,} evaluated per epoch):"]
    lines += [f"  {k:<40}{v / 60:>8.1f} min" for k, v in book["parts_s"].items()]
    lines.append(f"  {'total':<40}{book['total_s'] / 60:>8.1f} min (training, evaluation, cache; "
                 f"not notebook start-up, plots, reports)")
    if book.get("teachers_found"):
        lines.append(f"  {'total reusing the teachers found':<40}{book['total_reusing_s'] / 60:>8.1f} min "
                     f"({', '.join(book['teachers_found'])} already trained with these settings, e.g. the "
                     f"shipped reference teachers: make book loads them instead of training them)")
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    dev = result["device"]
    where = cpu_name()
    if dev.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(torch.device(dev))} (host CPU {where})"
    return (f"machine: {where}; {result['threads']} torch threads; device {dev}; "
            f"torch {torch.__version__}")


def _header(result: dict, repeats: int) -> str:
    names = ", ".join(TEACHERS[:result["teachers"]])
    best = f"best of {repeats} passes" if repeats > 1 else "one pass"
    return (f"one training epoch over {result['samples']} Fashion-MNIST samples (batch 128), "
            f"{result['teachers']} teachers ({names}), {result['precision']}, {best} per method")


def work_line(result: dict) -> str:
    """FLOPs per training step of the cache-served methods, and the ratio bounds they give."""
    mf, bounds = result["method_mflop_per_step"], result["ratio_bounds"]
    work = ", ".join(f"{m} {v:,.0f}" for m, v in mf.items())
    least = ", ".join(f"{k} {v:.2f}" for k, v in bounds.items())
    return (f"M={result['teachers']}: MFLOP per training step (batch 128): {work}. Least ratios if each "
            f"method's extra FLOPs ran at the peak, its memory-bound work free: {least}.")


def steps_line(result: dict) -> str:
    """The interleaved single steps: median ms per method and their ratios to scratch."""
    ms = ", ".join(f"{m} {v:.1f}" for m, v in result["step_ms"].items())
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in result["step_ratios"].items())
    return (f"M={result['teachers']}: single steps taken in turn ({result['step_rounds']} rounds, one step of each "
            f"method per round), median ms: {ms}; ratios of the medians: {ratios}.")


def format_table(result: dict, repeats: int = 1) -> str:
    s = result["seconds"]
    lines = [_header(result, repeats), TEACHER_NOTE, "",
             f"{'method':<14}{'seconds':>9}{'x scratch':>11}  what runs"]
    for m in s:
        lines.append(f"{m:<14}{s[m]:>9.2f}{s[m] / s['scratch']:>11.2f}  {DESCRIPTIONS[m]}")
    lines.append("")
    lines += [f"{k:<22}{v:>7.2f}" for k, v in result["ratios"].items()]
    lines += ["", steps_line(result)]
    peak = result["matmul_gflop_per_s"]
    lines += ["", f"{'model':<18}{'MFLOP/step':>11}{'ms/step':>9}{'GFLOP/s':>9}{'% of peak':>11}"]
    lines += [f"{n:<18}{r['mflop_per_step']:>11.0f}{r['step_s'] * 1e3:>9.1f}{r['gflop_per_s']:>9.1f}"
              f"{100 * r['gflop_per_s'] / peak:>10.0f}%" for n, r in result["models"].items()]
    lines += ["", f"peak: one fp32 2048x2048 matrix product, {peak:.1f} GFLOP/s on these cores",
              work_line(result)]
    lines += ["", f"teacher cache: built in {result['cache_build_s']:.2f} s (train + test), "
                  f"{result['cache_bytes'] / 2**20:.1f} MiB"]
    if "view_cache_build_s" in result:
        lines.append(f"teacher view cache (augment: crop, logits only): built once in "
                     f"{result['view_cache_build_s']:.2f} s (25 passes per teacher over the training samples), "
                     f"{result['view_cache_bytes'] / 2**20:.1f} MiB")
    lines.append(machine_line(result))
    return "\n".join(lines)


def format_markdown(result: dict, repeats: int = 1) -> str:
    s = result["seconds"]
    lines = ["| method | what runs each step | s / epoch | × scratch |", "|---|---|---:|---:|"]
    for m in s:
        lines.append(f"| `{m}` | {DESCRIPTIONS[m]} | {s[m]:.2f} | {s[m] / s['scratch']:.2f} |")
    r = result["ratios"]
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.items())
    views = (f"; view cache (crop) built once in {result['view_cache_build_s']:.1f} s, "
             f"{result['view_cache_bytes'] / 2**20:.1f} MiB" if "view_cache_build_s" in result else "")
    lines += ["", work_line(result), "", steps_line(result),
              "", f"Seconds for {_header(result, repeats)}; {TEACHER_NOTE}. Teacher cache (train + test) "
                  f"built in {result['cache_build_s']:.1f} s, {result['cache_bytes'] / 2**20:.1f} MiB{views}. "
                  f"Ratios: {ratios}. M{machine_line(result)[1:]}."]
    return "\n".join(lines)


def speed_markdown(results: list[dict], repeats: int = 1, load: tuple | None = None,
                   target: str = "docs/speed.md", block: str = "speed") -> str:
    """The README's Speed table: one column pair (seconds, x scratch) per teacher count."""
    head = "| method | what runs each step | " + " | ".join(
        f"s / epoch, M={r['teachers']} | × scratch" for r in results) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(results)]
    for m in (m for m in METHODS if any(m in r["seconds"] for r in results)):
        cells = " | ".join(f"{r['seconds'][m]:.2f} | {r['seconds'][m] / r['seconds']['scratch']:.2f}"
                           if m in r["seconds"] else "– | –" for r in results)
        lines.append(f"| `{m}` | {DESCRIPTIONS[m]} | {cells} |")
    r0 = results[0]
    best = f"best of {repeats} passes" if repeats > 1 else "one pass"
    cache = "; ".join(f"M={r['teachers']}: built in {r['cache_build_s']:.1f} s, {r['cache_bytes'] / 2**20:.0f} MiB"
                      for r in results)
    views = "; ".join(f"M={r['teachers']}: built once in {r['view_cache_build_s']:.1f} s, "
                      f"{r['view_cache_bytes'] / 2**20:.0f} MiB" for r in results if "view_cache_build_s" in r)
    views = (f" Teacher view cache for `augment: crop` (logits on 25 views of each training image): {views}."
             if views else "")
    quiet = "" if load is None else f" Load average when it started: {load[0]:.2f}."
    timed = [m for m in METHODS if any(m in r["seconds"] for r in results)]
    flags = "".join(flag for flag, on in ((f" --methods {' '.join(timed)}", timed != METHODS),
                                          (f" --samples {r0['samples']}", r0["samples"] != 10_000),
                                          (f" --repeats {repeats}", repeats > 1),
                                          (f" --step-rounds {r0.get('step_rounds')}",
                                           r0.get("step_rounds", STEP_ROUNDS) != STEP_ROUNDS),
                                          (" --book", any("book" in r for r in results))) if on)
    lines += ["", f"Generated by `python -m kdlib bench --teachers {' '.join(str(r['teachers']) for r in results)}"
                  f"{flags} --readme {target}{'' if block == 'speed' else ' --block ' + block}`: one training epoch over "
                  f"{r0['samples']:,} Fashion-MNIST images (batch 128, params of `fashionmnist.yaml`), {best} per "
                  f"method, {r0['precision']}; {TEACHER_NOTE}. M{machine_line(r0)[1:]}.{quiet}",
              f"Teacher cache (train + test splits, hint features in fp16): {cache}.{views}"]
    lines += [""] + [work_line(r) for r in results]
    lines += [""] + [steps_line(r) for r in results if "step_ratios" in r]
    last = results[-1]  # the largest teacher set holds every model
    models, peak = last["models"], last["matmul_gflop_per_s"]
    lines += ["", "| model | MFLOP per training step (batch 128) | ms per step | GFLOP/s | % of peak |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| `{n}` | {r['mflop_per_step']:,.0f} | {r['step_s'] * 1e3:.1f} | {r['gflop_per_s']:.1f} | "
              f"{100 * r['gflop_per_s'] / peak:.0f}% |" for n, r in models.items()]
    lines += ["", "Each model trained alone (cross-entropy, Adam), median of 5 steps; FLOPs counted by "
                  "`torch.utils.flop_counter` (forward and backward); peak: one fp32 2048x2048 matrix "
                  f"product on the same cores, {peak:.1f} GFLOP/s (best of 5)."]
    books = [r["book"] for r in results if "book" in r]
    if books:
        b = books[0]
        lines += ["", f"`--book` estimate of `make book` from these measurements: {b['total_s'] / 60:.1f} min "
                      f"with the teachers trained"
                      + (f", {b['total_reusing_s'] / 60:.1f} min loading the shipped reference teachers "
                         f"(what `make book` does on a fresh clone)" if b["teachers_found"] else "")
                      + " (training, evaluation and the cache; not notebook start-up, plots, reports)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdlib bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000, help="training samples per epoch (default 10000)")
    ap.add_argument("--teachers", type=int, nargs="+", default=[3],
                    help="3 (cnn1, cnn2, resnet) or 5 (+ vgg, densenet); several values run one after another")
    ap.add_argument("--methods", nargs="+", metavar="NAME", default=None,
                    help=f"time only these rows (and scratch, which every ratio is taken to): {', '.join(METHODS)}; "
                         "the view cache is built only for a crop row (default: every row)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per method; the fastest is kept")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    ap.add_argument("--step-rounds", type=int, default=STEP_ROUNDS,
                    help=f"rounds of single steps taken in turn ({', '.join(FLOP_METHODS)})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    ap.add_argument("--data-root", default=None, help="torchvision's data folder (default: data)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--markdown", action="store_true", help="print a markdown table for the README")
    ap.add_argument("--save", help="also write the results (a JSON list, one object per M) to this file")
    ap.add_argument("--readme", help="replace the <!-- speed:start --> ... <!-- speed:end --> block of this file")
    ap.add_argument("--block", default="speed",
                    help="the block --readme replaces (default speed, the full table; e.g. speed-baselines for a "
                         "table of the rows named by --methods)")
    ap.add_argument("--book", action="store_true",
                    help=f"also estimate the whole book's time ({PARAMS_FILE.name}) from this run's measurements")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    try:
        rows = chosen_methods(args.methods)
    except ValueError as err:
        ap.error(str(err))
    book_teachers = bench_params()["teachers"]
    if args.book and book_teachers not in [TEACHERS[:m] for m in args.teachers]:
        ap.error(f"--book needs --teachers {len(book_teachers)} among the teacher counts (the teachers of "
                 f"{PARAMS_FILE.name}: {', '.join(book_teachers)})")
    book_methods = bench_params()["methods"]
    if args.book and not set(book_methods) <= set(rows):
        ap.error(f"--book needs the book's methods timed: add {', '.join(sorted(set(book_methods) - set(rows)))} "
                 f"to --methods (the methods of {PARAMS_FILE.name})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for m in args.teachers:
        try:
            result = run_benchmark(args.samples, m, args.precision, args.repeats, warmup=args.warmup,
                                   data_root=args.data_root, device=args.device, threads=args.threads,
                                   step_rounds=args.step_rounds, methods=args.methods,
                                   log=lambda *a, **k: print(*a, file=sys.stderr))
        except ValueError as err:
            ap.error(str(err))
        if args.book and TEACHERS[:m] == book_teachers:
            result["book"] = book_estimate(result, bench_params())
        results.append(result)
        if args.json:
            print(TEACHER_NOTE, file=sys.stderr)
            print(json.dumps(result), flush=True)
        elif args.markdown:
            print(format_markdown(result, args.repeats), flush=True)
        else:
            print(format_table(result, args.repeats), flush=True)
        if "book" in result and not args.json:
            print(format_book(result["book"]), flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1) + "\n")
    if args.readme:
        update_readme(args.readme, speed_markdown(results, args.repeats, load, Path(args.readme).as_posix(),
                                                  args.block), args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
